"""Bad settings and late failures: one error line before any output, and nothing left half-written."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import runner
from ldm.api import build_model
from ldm.image_io import image_to_tensor, mask_to_tensor, read_metadata
from ldm.models.diffusion.sampling.core import NoiseSource

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("argv,words", [
    (["--scale", "nan"], "guidance_scale must be a finite number"),
    (["--scale", "inf"], "guidance_scale must be a finite number"),
    (["--ddim_eta", "nan"], "eta must be a finite number"),
    (["--ddim_eta", "-5"], "eta must be at least 0"),
    (["guidance_rescale=2"], "guidance_rescale must be in [0, 1]"),
    (["--seed", str(2**64 - 1)], "seed must be in [0, 4294967295]"),
    (["--seed", str(2**32 - 1), "--n_iter", "2"], "up to 4294967296"),  # the 2nd image's seed overflows
    (["--device", "cuda:99"], "device 'cuda:99'"),
    (["--device", "banana"], "unknown device"),
    (["--H", "8192", "--W", "8192"], "GiB to decode"),
    (["--H", "100000", "--W", "100000"], "GiB to decode"),
    (["--prompt", "caf\udcff"], "not valid UTF-8"),  # an undecodable byte from the shell
])
def test_bad_settings_fail_before_any_output(txt2img, model_args, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    base = ["--prompt", "x", *FAST, "--outdir", str(out), *model_args]
    assert txt2img.run([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_outdir_blocked_by_a_file(txt2img, model_args, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert txt2img.run(["--prompt", "x", *FAST, "--outdir", str(blocker / "sub"), *model_args]) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "x"


@pytest.mark.slow
def test_late_failure_removes_what_the_run_wrote(txt2img, model_args, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert txt2img.run(["--prompt", "first", *FAST, "--outdir", str(out), *model_args]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real, calls = runner.generate, []

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure late in the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", fail_on_second_batch)
    assert txt2img.run(["--prompt", "second", *FAST, "--n_iter", "2", "--outdir", str(out), *model_args]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier run's files, unchanged
    assert read_metadata(out / "samples" / "00000.png")["prompt"] == "first"
    calls.clear()
    fresh = tmp_path / "fresh"
    assert txt2img.run(["--prompt", "second", *FAST, "--n_iter", "2", "--outdir", str(fresh), *model_args]) == 2
    assert not fresh.exists()  # a folder the failed run made is gone too


def test_sixteen_bit_grey_images_keep_their_range(tmp_path):
    values = np.linspace(0, 65535, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    Image.fromarray(values).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    x = image_to_tensor(img)
    expected = torch.from_numpy(values.astype(np.float32) / 65535 * 2 - 1)
    assert x.shape == (1, 3, 8, 8) and torch.allclose(x[0, 1], expected, atol=1e-6)
    mask = mask_to_tensor(img)
    assert torch.equal(mask[0, 0], torch.from_numpy(values >= 32768).float())  # not clipped to all-white


def test_noise_seeds_outside_32_bits_are_refused():
    assert torch.equal(NoiseSource([2**32 - 1]).randn((4,)), NoiseSource([2**32 - 1]).randn((4,)))
    for seed in (2**32, -1):
        with pytest.raises(ValueError, match="outside"):
            NoiseSource([seed])


@pytest.mark.parametrize("content,words", [
    (b'{"file_name": "a.png", "text": {"nested": 1}}\n', "row 1: 'text' is a dict, not text"),
    (b'{"file_name": "a.png", "text": "ok"}\n{broken\n', "line 2 is not valid JSON"),
    (b'["a.png", "text"]\n', "row 1 is a list"),
    (b'{"file_name": "a.png", "text": "caf\xe9"}\n', "not UTF-8"),
])
def test_caption_metadata_errors_name_the_file_and_row(tmp_path, content, words):
    from ldm.data.image_folder import ImageFolderDataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(content)
    with pytest.raises(ValueError) as err:
        ImageFolderDataset(tmp_path, size=8)
    assert "metadata.jsonl" in str(err.value) and words in str(err.value), err.value


# ---- checkpoint and LoRA values -------------------------------------------------------------------
def _tiny_state():
    torch.manual_seed(0)
    model = build_model(TINY)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage,words", [
    (lambda v: v.fill_(float("nan")), "NaN/inf"),
    (lambda v: v.__setitem__((0,) * v.dim(), float("inf")), "1 NaN/inf value(s)"),
])
def test_non_finite_weights_are_named_and_refused(tmp_path, damage, words):
    from ldm.api import load_model
    from ldm.checkpoint import CheckpointError, save_state_dict

    _, state = _tiny_state()
    key = "model.diffusion_model.out.2.weight"
    damage(state[key])
    save_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(TINY, tmp_path / "bad.safetensors")
    assert key in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_is_exact_for_every_float_dtype(dtype):
    """all_finite reduces with one sum: every NaN / inf (and -inf + inf) is caught, and finite values whose sum
    overflows (largest values of the dtype) still count as finite."""
    from ldm.checkpoint import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.full((64, 3), big, dtype=dtype))  # the sum overflows; the values do not
    assert all_finite(torch.randn(1000).to(dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000).to(dtype)
        t[517] = bad
        assert not all_finite(t), (dtype, bad)
    t = torch.zeros(4, dtype=dtype)
    t[0], t[1] = float("inf"), -float("inf")
    assert not all_finite(t)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_tensors_are_refused(tmp_path, dtype):
    from ldm.api import load_model
    from ldm.checkpoint import CheckpointError, save_state_dict

    _, state = _tiny_state()
    key = "first_stage_model.decoder.conv_out.bias"
    state[key] = torch.ones_like(state[key]).to(dtype)
    path = tmp_path / "bad.ckpt"
    save_state_dict(state, path)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' is {str(dtype).replace('torch.', '')}"):
        load_model(TINY, path)


def test_flipped_byte_inside_a_ckpt_is_caught_by_crc(tmp_path):
    import zipfile

    from ldm.checkpoint import CheckpointError, read_state_dict

    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, path)
    info = [i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data/0")][0]
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        read_state_dict(path)


def test_bad_lora_files_leave_the_model_unchanged(tmp_path):
    from safetensors.torch import save_file

    from ldm.lora import add_lora, load_lora, lora_state_dict, save_lora

    model, _ = _tiny_state()
    add_lora(model, rank=2, alpha=2.0)
    good = tmp_path / "good.safetensors"
    save_lora(model, good)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = lora_state_dict(model)
    cases = {}
    nan = dict(state)
    first = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[first] = torch.full_like(nan[first], float("nan"))
    cases["nan.safetensors"] = (nan, "NaN/inf")
    alpha = dict(state)
    alpha[next(k for k in alpha if k.endswith(".alpha"))] = torch.tensor(float("nan"))
    cases["alpha.safetensors"] = (alpha, "NaN/inf")
    for name, (tensors, words) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
        with pytest.raises(ValueError, match=words):
            load_lora(model, tmp_path / name)
    (tmp_path / "corrupt.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="load_lora: .*not a valid safetensors file"):
        load_lora(model, tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        load_lora(model, good, scale=float("nan"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_latent_cache_refuses_models_whose_conditioner_reads_more_than_text(tmp_path):
    from ldm.data.digits import DigitsDataset
    from ldm.data.latent_cache import build_cache

    model = build_model(ROOT / "configs/tiny/tiny-sd1-inpainting.yaml")
    with pytest.raises(ValueError, match="conditioner reads txt, mask, masked_image"):
        build_cache(model, DigitsDataset(split="train", size=16), tmp_path / "cache")


# ---- main.py: user errors are one line ------------------------------------------------------------
def _main_py(tmp_path: Path, *overrides: str):
    import os

    from tests.helpers import run_main_py

    return run_main_py(["experiment=tiny", f"hydra.run.dir={tmp_path / 'run'}", "progress_refresh=0",
                        "trainer.max_steps=1", "export.enabled=false", *overrides], cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})


def _resume_dir(tmp_path: Path, content: bytes) -> Path:
    ckpts = tmp_path / "old" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(content)
    return tmp_path / "old"


@pytest.mark.slow
@pytest.mark.parametrize("case,words", [
    ("channels", "param 'model_channels' must be an integer"),
    ("batch", "batch_size"),
    ("empty", "is empty"),
    ("random", "last.ckpt"),
    ("safetensors", "not a training checkpoint"),
    ("dtype", "export.dtype must be one of"),
])
def test_main_py_user_errors_are_one_line(tmp_path, case, words):
    from safetensors.torch import save_file

    if case == "channels":
        args = ["model.params.unet_config.params.model_channels='32'"]
    elif case == "batch":
        args = ["data.batch_size=abc"]
    elif case == "dtype":
        args = ["export.enabled=true", "export.dtype=int8"]
    elif case == "safetensors":
        save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"))
        args = [f"resume={_resume_dir(tmp_path, (tmp_path / 'w.safetensors').read_bytes())}"]
    else:
        args = [f"resume={_resume_dir(tmp_path, b'' if case == 'empty' else bytes(range(256)) * 40)}"]
    res = _main_py(tmp_path, *args)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr[-2000:]
