"""One-call loading of CompVis-layout checkpoints written by the test, and the CLI's error lines."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.api import build_model, load_model, save_model
from ldm.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
TINY_V2 = ROOT / "configs/tiny/tiny-sd2-v.yaml"


@pytest.fixture(scope="module")
def trained_like(tmp_path_factory):
    """A tiny SD1-layout model with EMA weights that differ from the raw ones, saved both ways."""
    torch.manual_seed(0)
    model = build_model(TINY, use_ema=True)
    with torch.no_grad():
        for buf_name, buf in model.model_ema.named_buffers():
            if buf.is_floating_point() and buf.dim() > 0:
                buf.add_(0.5)
    d = tmp_path_factory.mktemp("ckpt")
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, d / "model.ckpt")
    return model, d


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
@pytest.mark.parametrize("use_ema", [False, True])
def test_round_trip_raw_and_ema(trained_like, name, use_ema):
    src, d = trained_like
    model = load_model(TINY, d / name, use_ema=use_ema)
    assert not hasattr(model, "model_ema")
    src_sd = src.state_dict()
    for key, value in model.state_dict().items():
        expected = src_sd[key]
        if use_ema and key.startswith("model."):
            expected = src_sd["model_ema." + key[len("model."):].replace(".", "")]
        assert torch.equal(value, expected), key
    assert not any(t.is_meta for t in model.state_dict().values())
    # And the loaded model runs.
    c = model.get_learned_conditioning(["a photo of a cat"])
    assert torch.isfinite(model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), c)).all()


def test_fp16_file_loads_into_fp32_and_bf16(trained_like, tmp_path):
    src, _ = trained_like
    path = tmp_path / "half.safetensors"
    save_model(src, path, dtype=torch.float16, include_ema=False)
    m32 = load_model(TINY, path)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    w = "model.diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(m32.state_dict()[w], src.state_dict()[w], atol=2e-3, rtol=2e-3)
    mbf = load_model(TINY, path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in mbf.parameters())


def test_fp16_file_gets_its_schedule_back_in_float32(trained_like, tmp_path):
    """A half-precision file rounds alphas_cumprod & co. (by up to 2e-4): the loaded model has the exact float32
    schedule diffusers computes, unless the file's schedule is another one (then the file's, as CompVis)."""
    import diffusers

    src, _ = trained_like
    path = tmp_path / "half.safetensors"
    save_model(src, path, dtype=torch.float16, include_ema=False)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=src.linear_start, beta_end=src.linear_end,
                                  beta_schedule="scaled_linear").alphas_cumprod
    assert (src.alphas_cumprod.half().float() - ref).abs().max() > 1e-4  # what the file holds is rounded
    loaded = load_model(TINY, path)
    torch.testing.assert_close(loaded.alphas_cumprod, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(loaded.sqrt_recipm1_alphas_cumprod, src.sqrt_recipm1_alphas_cumprod, rtol=0, atol=0)
    other = {k: v for k, v in src.state_dict().items() if not k.startswith("model_ema.")}
    other["alphas_cumprod"] = (other["alphas_cumprod"] * 0.99).half()  # a schedule this config does not make
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other.safetensors"))
    kept = load_model(TINY, tmp_path / "other.safetensors")
    assert torch.equal(kept.alphas_cumprod, other["alphas_cumprod"].float())


def test_position_ids_key_is_optional(trained_like, tmp_path):
    src, _ = trained_like
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("model_ema.")}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "with_pos.safetensors"
    save_file(sd, str(path))
    model = load_model(TINY, path)
    assert model.cond_stage_model.transformer.text_model.embeddings.position_ids.flatten().tolist() == list(range(77))


def test_published_yaml_with_data_and_lightning_sections_builds():
    cfg = OmegaConf.load(ROOT / "configs/stable-diffusion/v2-inpainting-inference.yaml")
    cfg.data = {"target": "ldm.data.laion.WebDataModuleFromConfig", "params": {"batch_size": 8}}
    cfg.lightning = {"callbacks": {"image_logger": {"target": "main.ImageLogger"}}}
    model = build_model(cfg, empty=True)
    assert type(model).__name__ == "LatentInpaintDiffusion"
    assert model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9


def test_wrong_architecture_is_one_clear_error(trained_like):
    _, d = trained_like
    with pytest.raises(CheckpointError) as err:
        load_model(TINY_V2, d / "model.safetensors")
    msg = str(err.value)
    first = msg.splitlines()[0]
    assert "looks like SD 1.x" in first and "tiny-sd2-v.yaml" in first
    assert len(msg.splitlines()) <= 25, "key report should be grouped, not a dump"
    assert "cond_stage_model.transformer.text_model.*" in msg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/ckpt_tool.py"), *map(str, args)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)


def bad_files(tmp_path, good: Path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    data = good.read_bytes()
    files = {
        "corrupt.safetensors": b"\x00\x01garbage" * 100,
        "truncated.safetensors": data[: len(data) // 2],
        "truncated.ckpt": (good.with_suffix(".ckpt")).read_bytes()[:5000],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / n for n in files] + [evil], marker


@pytest.mark.slow
def test_cli_bad_files_one_line_no_traceback(trained_like, tmp_path):
    _, d = trained_like
    paths, marker = bad_files(tmp_path, d / "model.safetensors")
    for path in paths:
        res = run_tool("inspect", path)
        assert res.returncode == 2, (path, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    assert not marker.exists(), "a code-carrying pickle ran code"
    evil = paths[-1]
    assert "--unsafe-pickle" in run_tool("inspect", evil).stderr


@pytest.mark.slow
def test_cli_wrong_architecture_and_check(trained_like):
    _, d = trained_like
    res = run_tool("check", d / "model.safetensors", "--config", TINY_V2)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error:") and "looks like SD 1.x" in res.stderr.splitlines()[0]
    ok = run_tool("check", d / "model.ckpt", "--config", TINY, "--ema")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr


@pytest.mark.slow
def test_cli_convert_ema_half(trained_like, tmp_path):
    src, d = trained_like
    out = tmp_path / "ema16.safetensors"
    res = run_tool("convert", d / "model.ckpt", out, "--ema", "--dtype", "fp16")
    assert res.returncode == 0, res.stderr
    model = load_model(TINY, out)
    key = "model.diffusion_model.out.2.weight"
    expected = src.state_dict()["model_ema.diffusion_modelout2weight"]
    torch.testing.assert_close(model.state_dict()[key], expected, atol=2e-3, rtol=2e-3)
