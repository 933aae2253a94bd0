"""SD 2's x4 upscaler: the official layout, diffusers parity, the noise augmentation, tiling, scripts/upscale.py."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.api import OPTIONAL_KEYS, build_model, guess_architecture, load_model, save_model
from ldm.checkpoint import CheckpointError, check_state_dict, read_state_dict, save_state_dict
from ldm.image_io import read_metadata
from ldm.models.diffusion.ddpm import LatentUpscaleDiffusion
from ldm.modules.diffusionmodules.upscaling import (LOW_SCALE_BUFFERS, ImageConcatWithNoiseAugmentation,
                                                    SimpleImageConcat)
from ldm.upscale import upscale
from tests.helpers import numel, randomize_, rel_err
from tests.test_manifests import build_on_meta, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = "x4-upscaling.yaml"
TINY = ROOT / "configs/tiny/tiny-sd2-upscaler.yaml"
# (UNet, VAE, OpenCLIP text encoder, total) parameters of the published model (see tests/reference/README.md).
COUNTS = (473_398_020, 55_325_927, 354_032_641, 882_756_588)


@pytest.fixture(scope="module")
def tiny() -> LatentUpscaleDiffusion:
    """The tiny upscaler with every weight re-drawn (no zero-initialised output layer), output scaled near a
    trained model's."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    randomize_(model.model.diffusion_model, seed=1)
    randomize_(model.first_stage_model, seed=2)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


# ---- the official layout ------------------------------------------------------------------------------------
def test_official_config_builds_the_published_layout(reference_dir):
    model = build_on_meta(OFFICIAL, {})
    assert isinstance(model, LatentUpscaleDiffusion) and model.model.conditioning_key == "hybrid-adm"
    expected = read_manifest(reference_dir / "sd-x4-upscaler.tsv")
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    assert sorted(set(expected) ^ set(got)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert [k for k in got if k.startswith("low_scale_model.")] == [f"low_scale_model.{b}" for b in LOW_SCALE_BUFFERS]
    assert (numel(model.model.diffusion_model), numel(model.first_stage_model), numel(model.cond_stage_model),
            numel(model)) == COUNTS
    assert model.low_scale_model.max_noise_level == 350 and model.parameterization == "v"


def test_official_file_layout_loads_strictly(reference_dir):
    """A state dict with the published keys and shapes (meta tensors: no memory) passes the loader's strict check,
    with the low-scale buffers as the file has them, or dropped by a converter; EMA copies are not expected."""
    model = build_model(ROOT / "configs/stable-diffusion" / OFFICIAL, empty=True, use_ema=False)
    manifest = read_manifest(reference_dir / "sd-x4-upscaler.tsv")
    file = {k: torch.empty(shape, device="meta") for k, (shape, _) in manifest.items()}
    assert not any(k.startswith("model_ema.") for k in file)
    check_state_dict(model, file, strict=True, optional_keys=OPTIONAL_KEYS)
    dropped = {k: v for k, v in file.items() if not k.startswith("low_scale_model.")}
    check_state_dict(model, dropped, strict=True, optional_keys=OPTIONAL_KEYS)
    assert guess_architecture({k: s for k, (s, _) in manifest.items()}) == "SD 2.x x4 upscaler"


def test_tiny_checkpoint_round_trips_through_load_model(tiny, tmp_path):
    path = tmp_path / "tiny-upscaler.safetensors"
    save_model(tiny, path)
    assert "low_scale_model.alphas_cumprod" in read_state_dict(path)
    loaded = load_model(TINY, path)
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # A file without the low-scale buffers (they follow from the config) loads too, with the same values.
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("low_scale_model.")}
    save_state_dict(state, tmp_path / "no-buffers.safetensors")
    again = load_model(TINY, tmp_path / "no-buffers.safetensors")
    assert torch.equal(again.low_scale_model.sqrt_alphas_cumprod, tiny.low_scale_model.sqrt_alphas_cumprod)
    with pytest.raises(CheckpointError, match="x4 upscaler"):  # an upscaler file with an SD 2 config: named
        load_model(ROOT / "configs/tiny/tiny-sd2-v.yaml", path)


# ---- noise augmentation ---------------------------------------------------------------------------------------
def test_noise_augmentation_is_q_sample_of_its_own_schedule():
    """Closed form: betas linear in sqrt from 1e-4 to 0.02 over 1000 steps, x_t = sqrt(ab) x + sqrt(1 - ab) n."""
    aug = ImageConcatWithNoiseAugmentation({"linear_start": 1e-4, "linear_end": 0.02}, max_noise_level=350)
    betas = np.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1 - betas)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    levels = torch.tensor([0, 20, 349])
    out, got_levels = aug(x, levels, noise)
    ab = torch.tensor(alpha_bar[levels.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = ab.sqrt() * x.double() + (1 - ab).sqrt() * noise.double()
    assert torch.equal(got_levels, levels)
    assert (out.double() - expected).abs().max() < 1e-6
    assert torch.allclose(aug.alphas_cumprod.double(), torch.tensor(alpha_bar), rtol=1e-6, atol=0)
    # Training: random levels below max_noise_level; SimpleImageConcat keeps the image at level 0.
    _, drawn = aug(torch.zeros(64, 3, 2, 2))
    assert drawn.dtype == torch.long and 0 <= drawn.min() and drawn.max() < 350
    same, zero = SimpleImageConcat()(x)
    assert same is x and torch.equal(zero, torch.zeros(3, dtype=torch.long))

    diffusers = pytest.importorskip("diffusers")
    low_res_scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)
    assert rel_err(out, low_res_scheduler.add_noise(x, noise, levels)) < 1e-6


# ---- diffusers parity -------------------------------------------------------------------------------------------
def _diffusers_unet(model: LatentUpscaleDiffusion):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel

    ckpt = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    original = {"model": {"params": OmegaConf.to_container(OmegaConf.load(TINY).model.params, resolve=True)}}
    cfg = single_file.create_unet_diffusers_config_from_ldm(original, ckpt)
    assert cfg["num_class_embeds"] == 1000 and cfg["only_cross_attention"] == [True, False] and cfg["in_channels"] == 7
    unet = UNet2DConditionModel(**cfg).eval()
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, cfg), strict=True)
    return unet, original, single_file


def test_unet_with_noise_level_labels_matches_diffusers(tiny):
    unet, _, _ = _diffusers_unet(tiny)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 12, 10, generator=g)
    t, levels = torch.tensor([999, 37]), torch.tensor([20, 350])
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours = tiny.model.diffusion_model(x, t, context=context, y=levels)
        ref = unet(x, t, encoder_hidden_states=context, class_labels=levels).sample
        other_level = tiny.model.diffusion_model(x, t, context=context, y=levels.flip(0))
    assert ours.std() > 0.1 and rel_err(other_level, ours) > 1e-3  # the label matters
    err = rel_err(ours, ref)
    print(f"upscaler UNet vs diffusers: rel err {err:.1e}")
    assert err < 1e-5


def test_upscale_matches_diffusers_upscale_pipeline(tiny):
    """diffusers' StableDiffusionUpscalePipeline on the same weights (UNet and VAE converted by diffusers' own
    utilities), DDIM, 4 steps, guidance 5, noise level 40: the same seed gives the same 4x image."""
    diffusers = pytest.importorskip("diffusers")
    unet, original, single_file = _diffusers_unet(tiny)
    vae_ckpt = {f"first_stage_model.{k}": v for k, v in tiny.first_stage_model.state_dict().items()}
    vae_cfg = single_file.create_vae_diffusers_config_from_ldm(original, vae_ckpt, scaling_factor=0.08333)
    vae = diffusers.AutoencoderKL(**vae_cfg).eval()
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(vae_ckpt, vae_cfg), strict=True)
    schedule = dict(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    pipe = diffusers.StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, low_res_scheduler=diffusers.DDPMScheduler(**schedule),
        scheduler=diffusers.DDIMScheduler(**schedule, prediction_type="v_prediction", clip_sample=False,
                                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading"),
        max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        context = tiny.get_learned_conditioning(["a red fox in the snow", "blurry"])
    seed, kw = 11, dict(steps=4, guidance_scale=5.0, noise_level=40, sampler="ddim", progress=False)
    ref = pipe(image=image, prompt_embeds=context[:1], negative_prompt_embeds=context[1:], num_inference_steps=4,
               guidance_scale=5.0, noise_level=40, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ours = upscale(tiny, ["a red fox in the snow"], image * 2 - 1, seeds=[seed], negative_prompt="blurry", **kw)
    assert ours.shape == ref.shape == (1, 3, 48, 64) and ref.std() > 0.05
    err = rel_err(ours, ref)
    print(f"upscale vs diffusers StableDiffusionUpscalePipeline: rel err {err:.1e}")
    assert err < 1e-5


# ---- tiling ---------------------------------------------------------------------------------------------------------
class _Pointwise(torch.nn.Module):
    """A 'model' without spatial context: tiling it must change nothing (tiles line up, weights sum to one)."""

    parameterization = "v"

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.clone())

    def apply_model(self, x, t, cond):
        return torch.tanh(x) * cond["c_concat"][0][:, :1] + cond["c_adm"].view(-1, 1, 1, 1) * t.view(-1, 1, 1, 1) / 1e6


def test_tiled_denoiser_windows_line_up_and_blend_to_one(tiny):
    from ldm.models.diffusion.sampling import DiscreteDenoiser
    from ldm.models.diffusion.sampling.tiled import TiledDenoiser, tile_boxes

    model = _Pointwise(tiny.alphas_cumprod)
    g = torch.Generator().manual_seed(8)
    x, low = torch.randn(2, 4, 24, 40, generator=g), torch.randn(2, 3, 24, 40, generator=g)
    cond = {"c_concat": [low], "c_crossattn": [torch.randn(2, 77, 32, generator=g)], "c_adm": torch.tensor([20, 40])}
    sigma = torch.tensor([3.0, 0.5])
    assert len(tile_boxes(24, 40, 16, 4)) == 6
    whole = DiscreteDenoiser(model)(x, sigma, cond)
    assert (TiledDenoiser(model, 16)(x, sigma, cond) - whole).abs().max() < 1e-6


def test_tiles_are_close_to_untiled_without_seams_and_one_tile_is_untiled(tiny):
    low = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(7)) * 2 - 1
    kw = dict(steps=4, guidance_scale=4.0, noise_level=20, sampler="dpmpp_2m", progress=False)
    whole = upscale(tiny, ["a house"], low, seeds=[3], upscale_tile_size=None, **kw)
    assert torch.equal(upscale(tiny, ["a house"], low, seeds=[3], upscale_tile_size=40, **kw), whole)
    tiled = upscale(tiny, ["a house"], low, seeds=[3], upscale_tile_size=16, **kw)  # 2 x 3 tiles, overlap 4
    err = rel_err(tiled, whole)
    print(f"tiled (16) vs whole: rel err {err:.3f}")
    assert 0 < err < 0.1
    # No seams: the difference to the untiled image does not peak where tiles meet (it does for hard cuts).
    diff = (tiled - whole).abs()
    for per_line in (diff.mean(dim=(0, 1, 3)), diff.mean(dim=(0, 1, 2))):
        assert per_line.max() < 1.6 * per_line.median()


# ---- the script -----------------------------------------------------------------------------------------------------
def test_upscale_script_writes_a_4x_png_with_a_recipe_that_regenerates(tiny, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_script_upscale", ROOT / "scripts" / "upscale.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ckpt = tmp_path / "tiny-upscaler.safetensors"
    save_model(tiny, ckpt)
    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (15, 22, 3), dtype=np.uint8)).save(low)
    out = tmp_path / "out"
    argv = ["--init-img", str(low), "--prompt", "a tiny robot", "--noise_level", "30", "--ddim_steps", "3",
            "--seed", "5", "--outdir", str(out), "--config", str(TINY), "--ckpt", str(ckpt)]
    start = time.perf_counter()
    assert script.run(argv) == 0
    print(f"scripts/upscale.py on the tiny model: {time.perf_counter() - start:.1f} s")
    (png,) = sorted((out / "samples").iterdir())
    assert Image.open(png).size == (88, 56)  # 4x the input, an odd side losing its last pixel first
    meta = read_metadata(png)
    assert (meta["script"], meta["noise_level"], meta["steps"], meta["seed"], meta["height"], meta["width"]) == \
        ("upscale", 30, 3, 5, 56, 88)
    assert meta["init_img"] == str(low) and meta["upscale_tile_size"] == 256 and "strength" not in meta
    assert (out / "grid-0000.png").is_file() and "noise_level: 30" in (out / "config.yaml").read_text()

    assert script.run(["--regenerate", str(png), "--outdir", str(out)]) == 0
    again = out / "samples" / "00001.png"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))

    capsys.readouterr()
    assert script.run(["--help"]) == 0 and "noise_level (int, default 20)" in capsys.readouterr().out
    other = ["--config", str(ROOT / "configs/tiny/tiny-sd2-v.yaml"), "--ckpt", str(ckpt)]
    assert script.run(["--init-img", str(low), "--prompt", "x", "--outdir", str(tmp_path / "no"), *other]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an upscaler" in err and len(err.splitlines()) == 1 and not (tmp_path / "no").exists()


def test_console_command_is_declared():
    import tomllib

    from ldm import cli

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["ldm-upscale"] == "ldm.cli:upscale"
    assert callable(cli.upscale) and (ROOT / "configs" / "upscale.yaml").is_file()


def test_an_upscaler_without_noise_augmentation_ignores_the_level():
    from ldm.upscale import upscaler_config

    config = OmegaConf.load(TINY).model
    assert upscaler_config(config) == (4, 350)
    config.params.low_scale_config = {"target": "ldm.modules.diffusionmodules.upscaling.SimpleImageConcat"}
    assert upscaler_config(config) == (4, 0)
    torch.manual_seed(0)
    model = build_model(config).eval()
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    cat, levels = model.upscale_conditioning(low, torch.tensor([20]))
    assert torch.equal(cat, low) and levels.tolist() == [0]
    assert upscale(model, ["x"], low, seeds=[0], steps=2, noise_level=20, progress=False).shape == (1, 3, 32, 32)
