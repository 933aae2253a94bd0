"""ldm.data: digits, image folders (captions, corrupt files), webdataset shards, the datamodule."""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig, collate
from ldm.data.digits import DIGIT_NAMES, DigitsDataset
from ldm.data.image_folder import ImageFolderDataset

DIGITS = "ldm.data.digits.DigitsDataset"
FOLDER = "ldm.data.image_folder.ImageFolderDataset"


@pytest.fixture(scope="module")
def digits() -> dict[str, DigitsDataset]:
    return {s: DigitsDataset(split=s, size=16) for s in ("train", "validation", "all")}


def test_digits_split_is_stratified_disjoint_and_complete(digits):
    train, val = digits["train"], digits["validation"]
    assert len(train) + len(val) == len(digits["all"]) == 1797
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted([*train.indices.tolist(), *val.indices.tolist()]) == list(range(1797))
    counts = np.bincount(val.labels, minlength=10)
    totals = np.bincount(digits["all"].labels, minlength=10)
    assert (counts > 0).all()
    assert np.all(np.abs(counts - 0.1 * totals) <= 1), "val should hold ~10% of every class"


def test_digits_items_shape_range_and_captions(digits):
    ds = digits["train"]
    for i in (0, 1, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        x = item["image"]
        assert x.shape == (16, 16, 3) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert torch.equal(x[..., 0], x[..., 1]) and torch.equal(x[..., 1], x[..., 2])
        assert item["txt"] == f"a handwritten digit {DIGIT_NAMES[item['label']]}"
    seven = next(ds[i] for i in range(len(ds)) if ds[i]["label"] == 7)
    assert seven["txt"] == "a handwritten digit seven"
    assert ds.images.min() == -1 and ds.images.max() > 0.9  # uses the full range


def test_digits_native_size_matches_sklearn_pixels():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = DigitsDataset(split="all", size=8)
    item = ds[5]
    expected = torch.from_numpy(raw.images[5]).float() / 8.0 - 1.0
    torch.testing.assert_close(item["image"][..., 0], expected)
    assert item["label"] == int(raw.target[5])


def test_digits_split_deterministic_per_seed(digits):
    again = DigitsDataset(split="validation", size=16, seed=0)
    other = DigitsDataset(split="validation", size=16, seed=1)
    assert np.array_equal(again.indices, digits["validation"].indices)
    assert torch.equal(again[3]["image"], digits["validation"][3]["image"])
    assert not np.array_equal(other.indices, again.indices)
    with pytest.raises(ValueError, match="split"):
        DigitsDataset(split="tain")


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _png(root / "a.png", (255, 0, 0))
    (root / "a.txt").write_text("a red image\n")
    (root / "bad.png").write_bytes(os.urandom(300))
    (root / "bad.txt").write_text("never seen")
    Image.new("RGB", (20, 30), (0, 0, 255)).save(root / "c.jpg")  # no caption
    _png(root / "sub" / "b.png", (0, 255, 0), (20, 30))
    (root / "sub" / "b.txt").write_text("a green image")
    return root


def test_image_folder_sidecar_captions_and_missing_caption(folder):
    ds = ImageFolderDataset(folder, size=16, default_caption="<none>")
    assert [p.relative_to(folder).as_posix() for p in ds.paths] == ["a.png", "bad.png", "c.jpg", "sub/b.png"]
    assert ds.captions == ["a red image", "never seen", "<none>", "a green image"]
    assert ds.missing_captions == 1
    a = ds[0]
    assert a["image"].shape == (16, 16, 3) and a["image"].dtype == torch.float32
    assert a["txt"] == "a red image" and a["path"].endswith("a.png")
    torch.testing.assert_close(a["image"][..., 0], torch.ones(16, 16))
    torch.testing.assert_close(a["image"][..., 1:], -torch.ones(16, 16, 2))
    b = ds[3]
    assert b["image"].shape == (16, 16, 3) and b["txt"] == "a green image"


def test_image_folder_skips_corrupt_file_once_and_reports(folder, caplog):
    ds = ImageFolderDataset(folder, size=16)
    with caplog.at_level(logging.WARNING, logger="ldm.data.image_folder"):
        first = ds[1]
        again = ds[1]
        items = [ds[i] for i in range(len(ds))]
    assert first["path"].endswith("c.jpg") and again["path"] == first["path"]
    assert all(not it["path"].endswith("bad.png") for it in items)
    assert ds.skipped == 1 and ds.skipped_paths == ["bad.png"]
    assert ds.skip_report() == "skipped 1 unreadable image(s) of 4: bad.png"
    assert sum("bad.png" in r.getMessage() for r in caplog.records) == 1


def test_image_folder_wraps_around_and_all_corrupt_is_clear(tmp_path):
    root = tmp_path / "w"
    _png(root / "a.png", (10, 20, 30))
    (root / "z.png").write_bytes(b"not a png")
    assert ImageFolderDataset(root, size=8)[1]["path"].endswith("a.png")
    (root / "a.png").write_bytes(b"")
    with pytest.raises(RuntimeError, match="could be decoded"):
        ImageFolderDataset(root, size=8)[0]


def test_image_folder_metadata_jsonl_beats_sidecar_and_csv(tmp_path):
    root = tmp_path / "hf"
    _png(root / "x.png", (0, 0, 0))
    _png(root / "train" / "y.png", (0, 0, 0))
    (root / "x.txt").write_text("sidecar loses")
    rows = [{"file_name": "x.png", "text": "first"}, {"file_name": "train/y.png", "text": "second"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "metadata.csv").write_text("file_name,text\nx.png,csv loses\n")
    ds = ImageFolderDataset(root, size=8)
    assert [ds[0]["txt"], ds[1]["txt"]] == ["second", "first"]  # sorted: train/y.png < x.png
    assert ds.missing_captions == 0
    (root / "metadata.jsonl").unlink()
    ds = ImageFolderDataset(root, size=8, default_caption="?")
    assert ds.captions == ["?", "csv loses"] and ds.missing_captions == 1


def test_image_folder_center_crop_and_resize(tmp_path):
    root = tmp_path / "crop"
    root.mkdir()
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 255  # white middle third, black sides
    Image.fromarray(img).save(root / "wide.png")
    ds = ImageFolderDataset(root, size=12)
    x = ds[0]["image"]
    assert x.shape == (12, 12, 3)
    assert x[:, 2:-2].min() > 0.9  # the center crop is the white band
    rand = ImageFolderDataset(root, size=12, center_crop=False)
    assert all(rand[0]["image"].shape == (12, 12, 3) for _ in range(5))


def test_image_folder_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ImageFolderDataset(tmp_path / "nope")
    assert "nope" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(tmp_path / "empty")
    assert ".png" in str(err.value) and ".jpg" in str(err.value) and "\n" not in str(err.value)


def test_webdataset_shards_skip_corrupt(tmp_path):
    pytest.importorskip("webdataset")
    from ldm.data.webdataset import WebDatasetShards

    def png_bytes(color):
        buf = io.BytesIO()
        Image.new("RGB", (10, 14), color).save(buf, format="PNG")
        return buf.getvalue()

    shard = tmp_path / "shard-000.tar"
    entries = {"000.png": png_bytes((255, 0, 0)), "000.txt": b"red", "001.png": b"junk", "001.txt": b"bad",
               "002.jpg": png_bytes((0, 0, 255)), "002.txt": b"blue"}
    with tarfile.open(shard, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = WebDatasetShards(str(shard), size=8)
    items = list(ds)
    assert [it["txt"] for it in items] == ["red", "blue"] and ds.skipped == 1
    assert items[0]["image"].shape == (8, 8, 3)


def _dm(batch_size: int = 8, seed: int = 0, **kw) -> DataModuleFromConfig:
    train = {"target": DIGITS, "params": {"split": "train", "size": 8}}
    val = {"target": DIGITS, "params": {"split": "validation", "size": 8}}
    return DataModuleFromConfig(batch_size, train=train, validation=val, num_workers=0, seed=seed, **kw)


def test_datamodule_collates_batches():
    dm = _dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == torch.float32
    assert isinstance(batch["txt"], list) and len(batch["txt"]) == 8 and all(isinstance(t, str) for t in batch["txt"])
    assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
    assert all(t.endswith(DIGIT_NAMES[int(l)]) for t, l in zip(batch["txt"], batch["label"]))
    val = list(dm.val_dataloader())
    assert sum(len(b["txt"]) for b in val) == len(dm.datasets["validation"])  # no drop_last on val
    out = collate([{"a": 1, "s": "x", "f": 0.5}, {"a": 2, "s": "y", "f": 1.5}])
    assert out["a"].tolist() == [1, 2] and out["s"] == ["x", "y"] and out["f"].dtype == torch.float32


def test_datamodule_seeded_shuffle_is_reproducible():
    def labels(dm: DataModuleFromConfig, epoch: int = 0) -> list[int]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [int(i) for b, _ in zip(loader, range(3)) for i in b["label"]]

    a, b, c = _dm(seed=1), _dm(seed=1), _dm(seed=2)
    assert labels(a) == labels(b)
    assert labels(a) != labels(c)
    assert labels(a, epoch=1) != labels(a, epoch=0) and labels(a, epoch=1) == labels(b, epoch=1)
    # Lightning's own per-epoch hook reaches the sampler.
    from lightning_fabric.utilities.data import _set_sampler_epoch

    loader = a.train_dataloader()
    _set_sampler_epoch(loader, 3)
    assert loader.sampler.epoch == 3


def test_datamodule_batch_larger_than_dataset_is_clear(folder):
    train = {"target": FOLDER, "params": {"root": str(folder), "size": 8}}
    dm = DataModuleFromConfig(batch_size=8, train=train, num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "8" in msg and "4" in msg and "data.batch_size" in msg and "\n" not in msg
    DataModuleFromConfig(batch_size=8, train=train, num_workers=0, drop_last=False).setup("fit")


def test_datamodule_counts_skips_from_worker_processes(folder):
    train = {"target": FOLDER, "params": {"root": str(folder), "size": 8}}
    dm = DataModuleFromConfig(batch_size=2, train=train, num_workers=1)
    assert dm.num_workers == 1
    dm.setup("fit")
    assert dm.skipped_images() == 0
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape == (2, 8, 8, 3)
    assert dm.skipped_images() == 1  # flagged inside the worker, visible here
    assert DataModuleFromConfig(batch_size=1).num_workers == min(2, os.cpu_count() or 1)
