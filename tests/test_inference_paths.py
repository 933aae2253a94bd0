"""Inference fast paths: memory format inside the UNet, bf16/fp16 weights, torch.compile."""
import math
from pathlib import Path

import pytest
import torch

from ldm.api import build_model, load_model
from ldm.generation import generate, precision_context, prepare_for_inference
from tests.helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
TINY_V2 = ROOT / "configs/tiny/tiny-sd2-v.yaml"
DEMO = ROOT / "ldm" / "assets" / "digits_demo"


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("config", [TINY, TINY_V2], ids=["conv-proj", "linear-proj"])
def test_every_convolution_gets_a_contiguous_input(config):
    # A channels_last input makes a CPU convolution reorder (copy) its whole weight on every call:
    # this once cost 20% of an SD 1.x step. The spatial transformer must hand back NCHW-contiguous maps.
    unet = build_model(config).model.diffusion_model.eval()
    seen = []

    def hook(module, args):
        seen.append((module, args[0].is_contiguous()))

    handles = [m.register_forward_pre_hook(hook) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    ctx_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    with torch.no_grad():
        unet(torch.randn(2, unet.in_channels, 16, 16), torch.tensor([10, 900]), context=torch.randn(2, 77, ctx_dim))
    for h in handles:
        h.remove()
    assert len(seen) == sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    assert all(ok for _, ok in seen), [type(m).__name__ for m, ok in seen if not ok]


def test_autoencoder_convolutions_get_contiguous_inputs():
    first = build_model(TINY).first_stage_model.eval()
    bad = []
    hooks = [m.register_forward_pre_hook(lambda m, a: bad.append(m) if not a[0].is_contiguous() else None)
             for m in first.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        z = first.encode(torch.randn(1, 3, 32, 32)).mode()
        first.decode(z)
    for h in hooks:
        h.remove()
    assert not bad, [type(m).__name__ for m in bad]


def test_bf16_weights_run_natively_and_stay_close_to_fp32(monkeypatch):
    model = load_model(DEMO / "config.yaml", DEMO / "model.safetensors")
    opts = dict(seeds=[3], steps=10, height=16, width=16, guidance_scale=3.0, progress=False)
    ref = generate(model, ["a handwritten digit three"], precision="fp32", **opts)
    prepare_for_inference(model, "bf16")
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert next(model.cond_stage_model.parameters()).dtype == torch.bfloat16
    assert next(model.first_stage_model.parameters()).dtype == torch.bfloat16

    def no_autocast(*args, **kwargs):
        raise AssertionError("bf16 weights must not go through autocast")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    fast = generate(model, ["a handwritten digit three"], precision="bf16", **opts)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    assert 30 < _psnr(fast, ref) < math.inf  # bf16 really ran, and the image is the same digit image


def test_cpu_autocast_decodes_under_bf16_autocast_too():
    """precision=autocast on a CPU is bf16 autocast (fp32's range: no VAE overflow), the decode included, as in
    diffusers under torch.autocast; fp32 decodes without it."""
    model = load_model(DEMO / "config.yaml", DEMO / "model.safetensors")
    seen = []
    hook = model.first_stage_model.decoder.register_forward_pre_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    opts = dict(seeds=[3], steps=10, height=16, width=16, guidance_scale=3.0, progress=False)
    try:
        ref = generate(model, ["a handwritten digit three"], precision="fp32", **opts)
        out = generate(model, ["a handwritten digit three"], precision="autocast", **opts)
    finally:
        hook.remove()
    assert seen == [False, torch.bfloat16]
    assert out.dtype == torch.float32 and 30 < _psnr(out, ref) < math.inf


def test_fp16_keeps_the_autoencoder_in_fp32():
    model = build_model(TINY).eval()
    prepare_for_inference(model, "fp16")
    assert next(model.model.parameters()).dtype == torch.float16
    assert next(model.cond_stage_model.parameters()).dtype == torch.float16
    assert next(model.first_stage_model.parameters()).dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("config", [TINY, ROOT / "configs/tiny/tiny-sd1-inpainting.yaml"], ids=["sd", "inpainting-9ch"])
def test_img2img_and_inpainting_run_with_low_precision_weights(config, precision):
    torch.manual_seed(0)
    ref_model = randomize_(build_model(config).eval(), seed=2)
    model = randomize_(build_model(config).eval(), seed=2)
    prepare_for_inference(model, precision)
    init = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    opts = dict(seeds=[1], steps=3, height=32, width=32, guidance_scale=3.0, progress=False, init_image=init, strength=0.6)
    for extra in ({}, {"mask": mask}):
        ref = generate(ref_model, ["a cat"], precision="fp32", **opts, **extra)
        out = generate(model, ["a cat"], precision=precision, **opts, **extra)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert 20 < _psnr(out, ref) < math.inf  # low precision really ran and stayed close


def test_autocast_is_used_only_when_weights_are_not_already_low_precision():
    cpu = torch.device("cpu")
    assert isinstance(precision_context("bf16", cpu, torch.float32), torch.autocast)
    assert not isinstance(precision_context("bf16", cpu, torch.bfloat16), torch.autocast)
    assert isinstance(precision_context("autocast", cpu, torch.float32), torch.autocast)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision_context("half", cpu)


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    torch.manual_seed(0)
    model = randomize_(build_model(TINY).eval(), seed=1)
    opts = dict(seeds=[5], steps=3, height=32, width=32, guidance_scale=4.0, progress=False)
    ref = generate(model, ["a red cube"], **opts)
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=False):  # restores the process-wide setting afterwards
        _compile_and_compare(model, ref, opts)


def test_compile_keeps_its_kernel_cache_in_the_user_cache_folder(monkeypatch, tmp_path):
    """compile=True points inductor's cache at ~/.cache/ldm/torchinductor (XDG_CACHE_HOME honoured), unless the
    user chose a folder; nothing compiles until the first call, so this costs no compilation."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    model = build_model(TINY).eval()
    with inductor_config.patch(freezing=False):
        prepare_for_inference(model, "fp32", compile=True)
    assert cache_dir() == str(tmp_path / "ldm" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    prepare_for_inference(build_model(TINY).eval(), "fp32", compile=True)
    assert cache_dir() == str(tmp_path / "mine")


def _compile_and_compare(model, ref, opts):
    prepare_for_inference(model, "fp32", compile=True)
    assert hasattr(model.model.diffusion_model, "_compiled_call_impl") and model.model.diffusion_model._compiled_call_impl
    out = generate(model, ["a red cube"], **opts)
    assert _psnr(out, ref) > 60
    # the state dict keeps its keys (nn.Module.compile wraps the call, not the module)
    assert all("_orig_mod" not in k for k in model.state_dict())
