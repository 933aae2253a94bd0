"""Latent + text-embedding caching: the cache holds exactly the encoders' outputs and training from it matches."""
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Subset

from ldm.data.digits import DigitsDataset
from ldm.data.latent_cache import CACHE_FILE, CachedLatentDataset, build_cache
from ldm.util import instantiate_from_config
from tests.test_training import main_py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = OmegaConf.load(ROOT / "configs/experiment/tiny.yaml")
    return instantiate_from_config(cfg.model)


def test_cache_holds_the_encoders_outputs_and_is_reused_only_for_the_same_weights(tiny, tmp_path):
    data = Subset(DigitsDataset(split="train", size=16), range(10))
    cache = build_cache(tiny, data, tmp_path / "c", batch_size=4, flip=True, dataset_id="digits")
    ds = CachedLatentDataset(cache)
    assert len(ds) == 10 and ds.info["context"]
    images = torch.stack([data[i]["image"] for i in range(10)]).permute(0, 3, 1, 2)
    with torch.no_grad():
        moments = tiny.encode_first_stage(images).parameters
        flipped = tiny.encode_first_stage(images.flip(-1)).parameters
        contexts = tiny.get_learned_conditioning([data[i]["txt"] for i in range(10)])
    torch.testing.assert_close(ds.tensors["moments"], moments, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.tensors["moments_flipped"], flipped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.tensors["context"], contexts, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moments, flipped)
    item = ds[3]
    assert item["txt"] == data[3]["txt"] and torch.equal(item["context"], ds.tensors["context"][3])
    assert any(torch.equal(item["moments"], ds.tensors[k][3]) for k in ("moments", "moments_flipped"))

    stamp = (cache / CACHE_FILE).stat().st_mtime_ns
    build_cache(tiny, data, cache, batch_size=4, flip=True, dataset_id="digits")
    assert (cache / CACHE_FILE).stat().st_mtime_ns == stamp  # same weights and data: reused
    with torch.no_grad():
        tiny.first_stage_model.encoder.conv_in.bias.add_(0.5)
    build_cache(tiny, data, cache, batch_size=4, flip=True, dataset_id="digits")
    assert (cache / CACHE_FILE).stat().st_mtime_ns != stamp  # other encoder weights: rebuilt
    assert not torch.allclose(CachedLatentDataset(cache).tensors["moments"], moments)


def test_get_input_from_the_cache_never_runs_the_encoders(tiny, tmp_path, monkeypatch):
    data = Subset(DigitsDataset(split="train", size=16), range(6))
    ds = CachedLatentDataset(build_cache(tiny, data, tmp_path / "c"))
    batch = {"moments": torch.stack([ds[i]["moments"] for i in range(6)]),
             "context": torch.stack([ds[i]["context"] for i in range(6)]), "txt": [ds[i]["txt"] for i in range(6)]}
    with torch.no_grad():
        null = tiny.get_learned_conditioning([""])[0]

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran although its output was cached")

    monkeypatch.setattr(tiny.first_stage_model, "encode", boom)
    tiny.train()
    tiny.ucg_training = {"txt": {"p": 0.0, "val": ""}}
    z, c = tiny.get_input(batch, "image")
    assert z.shape == (6, 4, 8, 8) and torch.equal(c, batch["context"])
    mean = tiny.scale_factor * batch["moments"][:, :4]
    assert (z - mean).abs().max() > 0  # a fresh posterior sample, not the mean
    tiny.ucg_training = {"txt": {"p": 1.0, "val": ""}}  # every caption dropped: the null context, computed once
    _, c = tiny.get_input(batch, "image")
    torch.testing.assert_close(c, null.expand_as(c))
    monkeypatch.setattr(tiny.cond_stage_model, "encode", boom)
    monkeypatch.setattr(tiny.cond_stage_model, "forward", boom)
    _, c = tiny.get_input(batch, "image")
    torch.testing.assert_close(c, null.expand_as(c))


@pytest.mark.slow
def test_training_from_the_cache_matches_training_from_images(tmp_path):
    common = ["trainer.max_steps=4", "export.enabled=false", "data.validation=null", "checkpoint.every_n_train_steps=4"]
    main_py(tmp_path, *common, run="images")
    res = main_py(tmp_path, *common, "data.cache.enabled=true", run="cached")
    info = json.loads((tmp_path / "cached" / "latent_cache" / "cache.json").read_text())
    assert info["context"] and info["items"] > 1000
    a = torch.load(tmp_path / "images" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cached" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ckpt = torch.load(tmp_path / "cached" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    # Same random draws in the same order: the same run up to float rounding of batched encoding, which Adam
    # can amplify to ~1e-5 on weights whose gradient is near zero. A different run (other batches, other noise)
    # moves every weight by ~lr per step: a whole-model relative difference of ~1e-3.
    diff = sum(float((b[k].float() - a[k].float()).pow(2).sum()) for k in a) ** 0.5
    norm = sum(float(a[k].float().pow(2).sum()) for k in a) ** 0.5
    assert diff / norm < 1e-5, diff / norm
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    assert res.returncode == 0


def test_a_damaged_cache_is_rebuilt(tiny, tmp_path):

    data = Subset(DigitsDataset(split="train", size=16), range(6))
    cache = build_cache(tiny, data, tmp_path / "c", batch_size=4, dataset_id="digits")
    good = (cache / CACHE_FILE).read_bytes()
    (cache / CACHE_FILE).write_bytes(good[: len(good) // 2])  # a truncated copy
    build_cache(tiny, data, cache, batch_size=4, dataset_id="digits")
    assert (cache / CACHE_FILE).read_bytes() == good
    assert len(CachedLatentDataset(cache)) == 6
