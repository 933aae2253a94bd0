"""SDXL memory options and shared parts: offload schedules, tiled encode, sliced decode, a separate VAE file,
the refiner reusing the base's text encoder 2 and VAE, and the refiner keeping an inpainting mask."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_sdxl import TINY_REFINER, TINY_XL, random_tiny

ROOT = Path(__file__).resolve().parents[1]
OPTS = dict(height=32, width=32, steps=4, guidance_scale=5, progress=False)


@pytest.fixture(scope="module")
def base():
    return random_tiny(TINY_XL, 0)


@pytest.fixture(scope="module")
def refiner(base):
    model = random_tiny(TINY_REFINER, 3)
    model.first_stage_model = base.first_stage_model  # as SDXL: the refiner's bigG text encoder and VAE are the base's
    model.conditioner.embedders[0] = base.conditioner.embedders[1]
    return model


# ---- tiled encode -------------------------------------------------------------------------------------

class LocalEncoder(torch.nn.Module):
    """An 'autoencoder' whose encoder has no spatial context: each 8x8 block -> one latent pixel's moments."""

    def encode(self, x):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        pooled = F.avg_pool2d(x, 8)
        return DiagonalGaussianDistribution(torch.cat([torch.tanh(pooled), pooled.pow(2) - 1], dim=1)[:, :8])


@pytest.mark.parametrize("h,w,tile,overlap", [(40, 40, 16, 4), (37, 21, 16, 8), (10, 12, 16, 4)])
def test_tiled_encode_is_exact_for_a_local_encoder_and_sees_one_tile_at_a_time(h, w, tile, overlap):
    from ldm.models.vae_tiling import tiled_encode

    enc = LocalEncoder()
    sizes = []
    original = enc.encode

    def spy(x):
        sizes.append(tuple(x.shape[-2:]))
        return original(x)

    enc.encode = spy
    x = torch.randn(2, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(0))
    out = tiled_encode(enc, x, 8, tile, overlap)
    ref = original(x)
    assert torch.allclose(out.mean, ref.mean, atol=1e-6) and torch.allclose(out.logvar, ref.logvar, atol=1e-5)
    assert max(max(s) for s in sizes) <= 8 * tile


def test_tiled_encode_of_a_real_vae_is_close_and_generate_uses_it(base):
    from ldm.generation import encode_image, generate

    image = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole, tiled = encode_image(base, image), encode_image(base, image, tile=16)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.25 * whole.abs().mean()
    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    common = dict(seeds=[1], init_image=init * 2 - 1, strength=0.5, **OPTS)
    # Below one tile, tiling changes nothing: the same image bit for bit.
    assert torch.equal(generate(base, ["a wall"], **common), generate(base, ["a wall"], vae_tiling=True, **common))


def test_sliced_decode_gives_the_same_pixels_as_decoding_the_batch(base):
    from ldm.generation import decode_latents

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    whole, sliced = decode_latents(base, z), decode_latents(base, z, slicing=True)
    assert torch.allclose(whole, sliced, atol=1e-5) and whole.std() > 0.01


# ---- offload --------------------------------------------------------------------------------------------

def test_model_offload_brings_one_part_at_a_time_and_changes_nothing(base, refiner):
    from ldm.generation import generate
    from ldm.offload import enable_offload

    plain = generate(base, ["a lighthouse"], seeds=[7], refiner=refiner, refiner_switch=0.6, **OPTS)
    hooks = enable_offload([base, refiner], "cpu", "model")
    try:
        offloaded = generate(base, ["a lighthouse"], seeds=[7], refiner=refiner, refiner_switch=0.6, **OPTS)
        moves = list(hooks.moves)
    finally:
        hooks.remove()
    assert torch.equal(plain, offloaded)
    # The shared text encoder 2 and VAE are one part each: base encoders, base UNet, refiner encoder, refiner
    # UNet, VAE — each brought in once, and the previous parts sent out before the next comes in (the text
    # encoders of one phase stay together).
    ins = [name for name, way in moves if way == "in"]
    assert ins == ["text_encoder_0", "text_encoder_1", "unet", "text_encoder_1", "unet@1", "vae"], moves
    on_device = set()
    for name, way in moves:
        if way == "in":
            together = name.startswith("text_encoder") and all(n.startswith("text_encoder") for n in on_device)
            assert together or not on_device, f"{name} came in while {on_device} was still there"
            on_device.add(name)
        else:
            on_device.discard(name)
    assert "_offload" not in base.__dict__ and not base._forward_pre_hooks


def test_sequential_offload_moves_single_layers_and_changes_nothing(base):
    from ldm.generation import generate
    from ldm.offload import enable_offload

    plain = generate(base, ["a lighthouse"], seeds=[8], **OPTS)
    hooks = enable_offload(base, "cpu", "sequential")
    try:
        offloaded = generate(base, ["a lighthouse"], seeds=[8], **OPTS)
        moves = list(hooks.moves)
    finally:
        hooks.remove()
    assert torch.equal(plain, offloaded)
    # Every layer goes back right after its own call (a layer may call no other layer in between).
    assert len(moves) > 100
    for (name_in, way_in), (name_out, way_out) in zip(moves[::2], moves[1::2]):
        assert (way_in, way_out) == ("in", "out") and name_in == name_out
    assert {name.split(".")[0] for name, _ in moves} == {"text_encoder_0", "text_encoder_1", "unet", "vae"}


def test_unknown_offload_mode_is_refused():
    from ldm.offload import Offload

    with pytest.raises(ValueError, match="unknown offload mode 'gpu'"):
        Offload(torch.nn.Linear(2, 2), "cpu", "gpu")


# ---- a separate VAE file ------------------------------------------------------------------------------

def test_vae_file_in_diffusers_layout_reads_back_as_the_compvis_weights(base, tmp_path):
    from safetensors.torch import save_file

    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from ldm.vae_file import vae_state_dict

    ours = {k: v.clone() for k, v in base.first_stage_model.state_dict().items()}
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.items()}
    from omegaconf import OmegaConf

    from ldm.api import load_config

    first = OmegaConf.to_container(load_config(TINY_XL).params.first_stage_config)
    cfg = single_file.create_vae_diffusers_config_from_ldm({"model": {"params": {"first_stage_config": first}}}, ckpt,
                                                           scaling_factor=0.13)
    diffusers_layout = single_file.convert_ldm_vae_checkpoint(ckpt, cfg)  # diffusers' own converter
    assert any(k.startswith("decoder.up_blocks.") for k in diffusers_layout)
    save_file({k: v.contiguous() for k, v in diffusers_layout.items()}, tmp_path / "vae.safetensors")
    back = vae_state_dict(tmp_path / "vae.safetensors")
    assert back.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(back[k], v), k


def test_vae_file_replaces_the_autoencoder_and_a_wrong_one_changes_nothing(tmp_path):
    from ldm.api import build_model, save_model
    from ldm.checkpoint import CheckpointError, save_state_dict
    from ldm.vae_file import replace_vae

    model = random_tiny(TINY_XL, 0)
    other = build_model(TINY_XL)
    torch.manual_seed(5)
    for p in other.first_stage_model.parameters():
        p.data.normal_(0, 0.05)
    save_state_dict(other.first_stage_model.state_dict(), tmp_path / "bare.safetensors")
    save_model(other, tmp_path / "whole.safetensors")
    for name in ("bare", "whole"):
        fresh = random_tiny(TINY_XL, 0)
        replace_vae(fresh, tmp_path / f"{name}.safetensors")
        for (k, a), b in zip(fresh.first_stage_model.state_dict().items(), other.first_stage_model.state_dict().values()):
            assert torch.equal(a, b), k
    sd1 = build_model(ROOT / "configs/tiny/tiny-sd1.yaml")
    save_state_dict({k: v for k, v in sd1.first_stage_model.state_dict().items()}, tmp_path / "small.safetensors")
    before = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    shapes_differ = any(a.shape != b.shape for a, b in zip(sd1.first_stage_model.state_dict().values(), before.values()))
    if shapes_differ:
        with pytest.raises(CheckpointError, match="does not fit the model's autoencoder"):
            replace_vae(model, tmp_path / "small.safetensors")
        assert all(torch.equal(v, before[k]) for k, v in model.first_stage_model.state_dict().items())
    save_state_dict({"x.weight": torch.zeros(2)}, tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        replace_vae(model, tmp_path / "none.safetensors")


# ---- the refiner shares the base's parts ---------------------------------------------------------------------

def test_refiner_loads_sharing_text_encoder_2_and_vae_and_renders_the_same(base, refiner, tmp_path):
    from ldm.api import load_model, save_model
    from ldm.generation import generate

    save_model(base, tmp_path / "base.safetensors")
    save_model(refiner, tmp_path / "refiner.safetensors")
    b = load_model(TINY_XL, tmp_path / "base.safetensors")
    r = load_model(TINY_REFINER, tmp_path / "refiner.safetensors", share_from=b)
    assert r.first_stage_model is b.first_stage_model
    assert r.conditioner.embedders[0] is b.conditioner.embedders[1]
    assert r.model is not b.model
    separate = load_model(TINY_REFINER, tmp_path / "refiner.safetensors")
    args = dict(seeds=[3], refiner_switch=0.5, **OPTS)
    assert torch.equal(generate(b, ["a boat"], refiner=r, **args), generate(b, ["a boat"], refiner=separate, **args))
    # Different weights in the file: nothing is shared.
    with torch.no_grad():
        refiner.conditioner.embedders[0].model.positional_embedding.add_(0.01)
    try:
        save_model(refiner, tmp_path / "refiner2.safetensors")
    finally:
        with torch.no_grad():
            refiner.conditioner.embedders[0].model.positional_embedding.sub_(0.01)
    r2 = load_model(TINY_REFINER, tmp_path / "refiner2.safetensors", share_from=b)
    assert r2.conditioner.embedders[0] is not b.conditioner.embedders[1]
    assert r2.first_stage_model is b.first_stage_model


# ---- the refiner keeps what the mask keeps ------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{"refiner_switch": 0.6}, {"refiner_strength": 0.5}])
def test_refiner_keeps_the_unmasked_latents_exactly(base, refiner, mode):
    from ldm.generation import encode_image, generate

    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    captured = []
    decode = refiner.decode_first_stage
    refiner.decode_first_stage = lambda z: (captured.append(z), decode(z))[1]
    try:
        generate(base, ["a stone wall"], seeds=[2], init_image=init * 2 - 1, mask=mask, refiner=refiner, **mode, **OPTS)
    finally:
        del refiner.decode_first_stage
    source = encode_image(base, init * 2 - 1)
    keep = F.interpolate(mask, size=source.shape[-2:], mode="nearest") == 0
    z = captured[0]
    assert torch.equal(z[keep.expand_as(z)], source[keep.expand_as(source)])
    assert (z - source).abs()[~keep.expand_as(z)].mean() > 1e-2  # the masked part was repainted


# ---- scripts: --vae, --offload ----------------------------------------------------------------------------

@pytest.mark.slow
def test_txt2img_with_a_vae_file_records_it_and_regenerates_bit_for_bit(base, tmp_path, monkeypatch):
    from PIL import Image

    from ldm.api import save_model
    from ldm.checkpoint import save_state_dict
    from ldm.image_io import read_metadata
    from tests.test_sdxl import _script

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    save_model(base, tmp_path / "base.safetensors")
    vae = {k: v + 0.01 * torch.randn_like(v) for k, v in base.first_stage_model.state_dict().items()}
    save_state_dict(vae, tmp_path / "vae.safetensors")
    txt2img = _script("txt2img")
    common = ["--prompt", "a lighthouse", "--H", "32", "--W", "32", "--ddim_steps", "4", "--n_samples", "1",
              "--n_iter", "1", "--config", str(TINY_XL), "--ckpt", str(tmp_path / "base.safetensors")]
    assert txt2img.run([*common, "--vae", str(tmp_path / "vae.safetensors"), "--offload", "model",
                        "--outdir", str(tmp_path / "a")]) == 0
    assert txt2img.run([*common, "--outdir", str(tmp_path / "b")]) == 0
    png = tmp_path / "a" / "samples" / "00000.png"
    meta = read_metadata(png)
    assert meta["vae"].endswith("vae.safetensors") and len(meta["vae_sha256"]) == 64
    pixels = np.asarray(Image.open(png))
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "b" / "samples" / "00000.png")))
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(tmp_path / "a")]) == 0
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "a" / "samples" / "00001.png")))
    save_state_dict({k: v * 1.01 for k, v in vae.items()}, tmp_path / "vae.safetensors")
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(tmp_path / "a")]) == 2
