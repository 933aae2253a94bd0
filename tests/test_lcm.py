"""Few-step sampling: LCM and TCD samplers (schedule, closed forms, diffusers parity), LCM-LoRA files in
diffusers' / PEFT's / kohya's layouts, and ``--sampler lcm --lora`` through scripts/txt2img.py."""
import copy
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.api import build_model
from ldm.generation import generate
from ldm.models.diffusion.sampling import DiscreteDenoiser, NoiseSource, sample
from ldm.models.diffusion.sampling.consistency import boundary_scalings
from ldm.models.diffusion.sampling.discretization import lcm_timesteps
from ldm.models.diffusion.schedule import schedule_tables
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONFIG, CONFIG_V = "configs/tiny/tiny-sd1.yaml", "configs/tiny/tiny-sd2-v.yaml"
PROMPTS, SEEDS = ["a photo of a cat", "a red house by the sea"], [5, 6]
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# The modules diffusers' LCM-LoRA distillation scripts adapt: attention, transformer projections and MLP, resnet
# convolutions and time projections, down/up samplers.
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def tiny_model(config: str = CONFIG) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(config).eval()
    randomize_(model.model.diffusion_model, seed=1)
    with torch.no_grad():  # keep the random UNet's output near a trained model's scale
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lcm")


def sd_pipeline(model: nn.Module, work, scheduler):
    from benchmarks.peers import diffusers_sd1_pipeline

    pipe = diffusers_sd1_pipeline(model, CONFIG, work, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler(sampler: str, prediction_type: str = "epsilon"):
    cls = diffusers.LCMScheduler if sampler == "lcm" else diffusers.TCDScheduler
    return cls(**BETAS, prediction_type=prediction_type, steps_offset=1)  # unused by both; 1 avoids a warning


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


# ---------------------------------------------------------------------------- schedule and closed forms
def test_schedule_is_diffusers_lcm_and_tcd_schedule():
    for steps in range(1, 51):
        for cls in (diffusers.LCMScheduler, diffusers.TCDScheduler):
            ref = cls(**BETAS)
            ref.set_timesteps(steps)
            assert np.array_equal(lcm_timesteps(steps)[::-1], ref.timesteps.numpy()), (cls.__name__, steps)
    assert list(lcm_timesteps(4)) == [259, 499, 759, 999]
    with pytest.raises(ValueError, match="takes 1 to 50 steps"):
        lcm_timesteps(51)


class FixedX0(nn.Module):
    """A 'network' that predicts the same clean latent at every level (x0 parameterization)."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        tables = schedule_tables("linear", 1000, 0.00085, 0.012)
        self.register_buffer("alphas_cumprod", torch.tensor(tables["alphas_cumprod"], dtype=torch.float32))
        self.parameterization = "x0"
        self.x0 = x0
        self.dummy = nn.Parameter(torch.zeros(()))

    def apply_model(self, z_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.x0.expand_as(z_t)


def test_lcm_steps_are_the_boundary_combination_in_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, x_T = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    model = FixedX0(x0)
    sig = DiscreteDenoiser(model).sigmas

    def run(sigmas=None, steps=1, seeds=None):
        return sample(model, None, sampler="lcm", steps=steps, sigmas=sigmas, x_T=None if seeds else x_T,
                      seeds=seeds, shape=(4, 6, 6), progress=False)

    def expected(t: float, z: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t)
        return c_skip * z + c_out * x0

    # One step from pure noise (t = 999: c_skip ~ 2.5e-7) and from a low level (t = 1: c_skip = 0.25 / 100.25) ...
    torch.testing.assert_close(run(), expected(999, x_T), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(torch.tensor([sig[1], 0.0])), expected(1, x_T), rtol=1e-6, atol=1e-6)
    c_skip, c_out = boundary_scalings(1)
    assert abs(c_skip - 0.25 / 100.25) < 1e-12 and abs(c_out - 10 / 100.25**0.5) < 1e-12
    # ... and at t = 0 the consistency function is the identity.
    torch.testing.assert_close(run(torch.tensor([sig[0], 0.0])), x_T, rtol=1e-6, atol=1e-6)

    # Two steps: the first estimate is re-noised to t = 499 with the next draw of the image's own seeded noise.
    source = NoiseSource([7])
    start, fresh = source.randn((4, 6, 6)), source.randn((4, 6, 6))
    first = expected(999, start)
    z = (first + sig[499] * fresh) / (1 + sig[499] ** 2).sqrt()
    torch.testing.assert_close(run(steps=2, seeds=[7]), expected(499, z), rtol=1e-6, atol=1e-6)


def test_guidance_at_most_one_is_one_unet_call_per_step(base):
    """LCM-LoRA's guidance_scale 1 (or below, as diffusers reads it) runs the conditional branch only; above 1
    prompt and negative prompt go through the UNet together."""
    model = copy.deepcopy(base)
    batches = []
    inner = model.apply_model

    def counting(x, t, cond, *args, **kwargs):
        batches.append(x.shape[0])
        return inner(x, t, cond, *args, **kwargs)

    model.apply_model = counting
    for scale, per_call in ((1.0, 2), (0.5, 2), (1.5, 4)):
        for sampler in ("lcm", "tcd"):
            batches.clear()
            generate(model, PROMPTS, seeds=SEEDS, sampler=sampler, steps=3, guidance_scale=scale, height=32, width=32,
                     negative_prompt="blurry", progress=False)
            assert batches == [per_call] * 3, (sampler, scale, batches)
    batches.clear()  # other samplers keep CompVis' rule: any scale but 1 is guided
    generate(model, PROMPTS, seeds=SEEDS, sampler="euler", steps=2, guidance_scale=0.5, height=32, width=32,
             progress=False)
    assert batches == [4, 4]


# ---------------------------------------------------------------------------- parity with diffusers
CASES = [("lcm", 1, 1.0, None), ("lcm", 2, 1.0, None), ("lcm", 4, 1.0, None), ("lcm", 4, 1.5, None),
         ("lcm", 4, 0.5, None), ("tcd", 1, 1.0, 0.3), ("tcd", 2, 1.0, 0.3), ("tcd", 4, 1.5, 0.3), ("tcd", 4, 1.0, 0.0),
         ("tcd", 4, 1.0, 1.0)]


@pytest.mark.parametrize("sampler,steps,scale,eta", CASES)
def test_generate_matches_diffusers_pipeline(base, work, sampler, steps, scale, eta):
    """Our generate() against StableDiffusionPipeline with LCMScheduler / TCDScheduler: same weights, same
    initial noise and the same per-step noise (both draw them in order from one generator per image)."""
    pipe = sd_pipeline(base, work, scheduler(sampler))
    extra = {} if eta is None else {"eta": eta}
    common = dict(height=32, width=32, num_inference_steps=steps, guidance_scale=scale, **extra)
    ref_latents = pipe(PROMPTS, generator=generators(), output_type="latent", **common).images
    ref = pipe(PROMPTS, generator=generators(), output_type="pt", **common).images
    with torch.no_grad():
        c, uc = base.get_learned_conditioning(PROMPTS), base.get_learned_conditioning(["", ""])
    latents = sample(base, c, uncond=uc, guidance_scale=scale, sampler=sampler, steps=steps, eta=eta,
                     shape=(4, 16, 16), seeds=SEEDS, progress=False)
    ours = generate(base, PROMPTS, seeds=SEEDS, sampler=sampler, steps=steps, guidance_scale=scale, eta=eta,
                    height=32, width=32, progress=False)
    print(f"{sampler} {steps} steps, scale {scale}, eta {eta}: latents {rel_err(latents, ref_latents):.1e} relative, "
          f"images {(ours - ref).abs().max().item():.1e} max")
    assert ref_latents.std() > 0.1 and ref.std() > 0.05
    assert rel_err(latents, ref_latents) < 1e-5
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def v_setup():
    """The tiny SD 2 v-prediction UNet and diffusers' conversion of it."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    model = tiny_model(CONFIG_V)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    original = {"model": {"params": OmegaConf.to_container(OmegaConf.load(CONFIG_V).model.params, resolve=True)}}
    config = single_file.create_unet_diffusers_config_from_ldm(original, ckpt)
    unet = diffusers.UNet2DConditionModel(**config).eval()
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    with torch.no_grad():
        c, uc = model.get_learned_conditioning(PROMPTS), model.get_learned_conditioning(["", ""])
    return model, unet, c, uc


@pytest.mark.parametrize("sampler,eta", [("lcm", None), ("tcd", 0.3)])
def test_v_prediction_matches_diffusers_scheduler(v_setup, sampler, eta):
    model, unet, c, uc = v_setup
    ref = scheduler(sampler, "v_prediction")
    ref.set_timesteps(4)
    gens = generators()
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=g) for g in gens])
    extra = {} if eta is None else {"eta": eta}
    with torch.no_grad():
        for t in ref.timesteps:
            out_u, out_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            latents = ref.step(out_u + 1.5 * (out_c - out_u), t, latents, generator=gens, **extra).prev_sample
    ours = sample(model, c, uncond=uc, guidance_scale=1.5, sampler=sampler, steps=4, eta=eta, shape=(4, 8, 8),
                  seeds=SEEDS, progress=False)
    print(f"{sampler} (v) 4 steps vs diffusers: {rel_err(ours, latents):.1e}")
    assert latents.std() > 0.1 and rel_err(ours, latents) < 1e-5


# ---------------------------------------------------------------------------- LCM-LoRA files
def randomize_lora_(module: nn.Module, seed: int, std: float = 0.3) -> None:
    """Nonzero LoRA B matrices (fresh adapters have B = 0, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def lcm_lora_files(base, work):
    """An LCM-LoRA-shaped adapter (rank 4, alpha 8 from the config, on the UNet + a text-encoder part), written by
    diffusers' own save utilities in its PEFT layout (with and without adapter metadata), and the same tensors in
    kohya's layout (diffusers' convert_state_dict_to_kohya) and diffusers' older ``lora.down/up`` spelling."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    pipe = sd_pipeline(base, work / "save", scheduler("lcm"))
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=LCM_TARGETS, init_lora_weights=True)
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=True)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # (transformers' add_adapter wants a newer peft)
    randomize_lora_(pipe.unet, seed=21)
    randomize_lora_(pipe.text_encoder, seed=22)
    unet_sd, text_sd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    files = {}
    for name, metadata in (("peft", True), ("peft_no_metadata", False)):
        folder = work / name
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd, safe_serialization=True,
            unet_lora_adapter_metadata=unet_config.to_dict() if metadata else None,
            text_encoder_lora_adapter_metadata=text_config.to_dict() if metadata else None)
        files[name] = folder / "pytorch_lora_weights.safetensors"
    prefixed = {**{f"unet.{k}": v for k, v in unet_sd.items()}, **{f"text_encoder.{k}": v for k, v in text_sd.items()}}
    kohya = convert_state_dict_to_kohya(prefixed)
    for key in [k for k in kohya if k.endswith(".alpha")]:  # the rank there; the config's alpha is 8 (UNet)
        kohya[key] = torch.tensor(8 if key.startswith("lora_unet_") else 2)
    files["kohya"] = work / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(files["kohya"]))
    # As LCM-LoRAs ship: the UNet part alone (diffusers' own kohya reader misses text-encoder keys of its converter
    # under transformers 5: they lack CLIP's text_model level, which our reader accepts).
    files["kohya_unet"] = work / "kohya_unet.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items() if k.startswith("lora_unet_")}, str(files["kohya_unet"]))
    old = convert_state_dict_to_diffusers(prefixed)
    files["old"] = work / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(files["old"]), metadata={
        "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "text_encoder.lora_alpha": 2})})
    return files


def test_lcm_lora_file_layouts(lcm_lora_files):
    peft = load_file(str(lcm_lora_files["peft"]))
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in peft
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in peft and peft[
        "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"].shape[2:] == (3, 3)  # LoRA on 3x3 convolutions
    assert "unet.down_blocks.0.downsamplers.0.conv.lora_B.weight" in peft
    assert any(k.startswith("text_encoder.") and k.endswith("layers.0.self_attn.q_proj.lora_A.weight") for k in peft)
    assert any(".lora.down.weight" in k for k in load_file(str(lcm_lora_files["old"])))
    assert any(k.startswith("lora_unet_") for k in load_file(str(lcm_lora_files["kohya"])))


def unet_text_forward(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 90])
    with torch.no_grad():
        return model.model.diffusion_model(x, t, model.get_learned_conditioning(PROMPTS)).float()


def lora_scalings(model: nn.Module) -> dict[str, float]:
    return {n: m.scaling["default"] for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")}


@pytest.mark.parametrize("layout", ["peft_no_metadata", "kohya", "old"])
def test_every_layout_loads_the_same_adapters(base, lcm_lora_files, layout):
    from ldm.lora import load_lora

    reference = copy.deepcopy(base)
    load_lora(reference, lcm_lora_files["peft"])
    model = copy.deepcopy(base)
    load_lora(model, lcm_lora_files[layout])
    lora = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    expected = {k: v for k, v in reference.state_dict().items() if ".lora_" in k}
    assert len(lora) == len(expected) > 100 and all(torch.equal(v, expected[k]) for k, v in lora.items())
    scalings, expected_scalings = lora_scalings(model), lora_scalings(reference)
    assert set(expected_scalings.values()) == {2.0, 1.0}  # UNet alpha 8 / rank 4, text encoder 2 / 2
    if layout == "peft_no_metadata":  # no adapter metadata: alpha = rank (diffusers' rule), scale 1 everywhere
        assert set(scalings.values()) == {1.0}
    else:
        assert scalings == expected_scalings
        torch.testing.assert_close(unet_text_forward(model), unet_text_forward(reference), rtol=0, atol=0)


@pytest.mark.parametrize("layout,fuse", [("peft", True), ("peft_no_metadata", False), ("kohya_unet", True)])
def test_lcm_lora_gives_diffusers_images(base, work, lcm_lora_files, layout, fuse):
    """diffusers' load_lora_weights (+ fuse_lora) and our load_lora (+ merge_lora) of the same file, then LCM at
    4 steps: the same images."""
    from ldm.lora import load_lora, merge_lora

    pipe = sd_pipeline(base, work / f"load-{layout}", scheduler("lcm"))
    pipe.load_lora_weights(str(lcm_lora_files[layout]))
    if fuse:
        pipe.fuse_lora()
    loaded = [n for n, m in pipe.unet.named_modules() if n.endswith(".lora_A")]
    assert any("resnets.0.conv1" in n for n in loaded) and any("downsamplers.0.conv" in n for n in loaded)
    ref = pipe(PROMPTS, generator=generators(), height=32, width=32, num_inference_steps=4, guidance_scale=1.0,
               output_type="pt").images
    model = copy.deepcopy(base)
    load_lora(model, lcm_lora_files[layout])
    if fuse:
        merge_lora(model)
    ours = generate(model, PROMPTS, seeds=SEEDS, sampler="lcm", steps=4, guidance_scale=1.0, height=32, width=32,
                    progress=False)
    plain = generate(base, PROMPTS, seeds=SEEDS, sampler="lcm", steps=4, guidance_scale=1.0, height=32, width=32,
                     progress=False)
    print(f"LCM-LoRA ({layout}, {'fused' if fuse else 'unfused'}) vs diffusers: {(ours - ref).abs().max().item():.1e}")
    assert (ours - plain).abs().max() > 0.05  # the LoRA matters ...
    assert (ours - ref).abs().max().item() < 1e-5  # ... and is applied as diffusers applies it


def test_unsupported_lora_keys_are_named(base, work, lcm_lora_files):
    from ldm.lora import load_lora

    state = load_file(str(lcm_lora_files["peft"]))
    for key in ("unet.mid_block.resnets.0.conv1.lora_magnitude_vector", "unet.mid_block.resnets.0.conv1.lora_B.bias"):
        path = work / "unsupported.safetensors"
        save_file({**state, key: torch.zeros(8)}, str(path))
        with pytest.raises(ValueError) as err:
            load_lora(copy.deepcopy(base), path)
        assert key in str(err.value) and "\n" not in str(err.value)
    path = work / "elsewhere.safetensors"  # a module this model lacks
    save_file({**state, "unet.down_blocks.5.resnets.0.conv1.lora_A.weight": torch.zeros(4, 32, 3, 3),
               "unet.down_blocks.5.resnets.0.conv1.lora_B.weight": torch.zeros(32, 4, 1, 1)}, str(path))
    with pytest.raises(ValueError, match="lora_unet_down_blocks_5_resnets_0_conv1"):
        load_lora(copy.deepcopy(base), path)


# ---------------------------------------------------------------------------- the script
@pytest.mark.slow
def test_txt2img_lcm_with_lora_records_and_regenerates(base, work, lcm_lora_files, txt2img, tmp_path):
    from ldm.api import save_model
    from ldm.files import sha256_file
    from ldm.image_io import read_metadata
    from PIL import Image

    ckpt = work / "tiny.safetensors"
    if not ckpt.exists():
        save_model(base, ckpt)
    model = ["--config", CONFIG, "--ckpt", str(ckpt)]
    fast = ["--prompt", "a red square", "--H", "32", "--W", "32", "--n_iter", "1", "--n_samples", "2", "--skip_grid"]
    lora = str(lcm_lora_files["peft"])
    out = tmp_path / "out"
    assert txt2img.run([*fast, "--sampler", "lcm", "--steps", "4", "--scale", "1.0", "--lora", lora,
                        "--outdir", str(out), *model]) == 0
    samples = sorted((out / "samples").iterdir())
    meta = read_metadata(samples[1])
    assert (meta["sampler"], meta["steps"], meta["guidance_scale"]) == ("lcm", 4, 1.0)
    assert meta["lora"] == lora and meta["lora_scale"] == 1.0 and meta["lora_sha256"] == sha256_file(lora)

    assert txt2img.run(["--regenerate", str(samples[1]), "--outdir", str(out)]) == 0
    again = out / "samples" / "00002.png"
    first, second = np.asarray(Image.open(samples[1])), np.asarray(Image.open(again))
    diff = np.abs(first.astype(int) - second.astype(int))
    assert diff.max() <= 1  # made in a batch of two: equal up to the kernels' rounding

    exact = tmp_path / "exact"  # made alone, regenerated alone: bit for bit
    assert txt2img.run([*fast, "--n_samples", "1", "--sampler", "lcm", "--steps", "2", "--scale", "1.0",
                        "--lora", lora, "--outdir", str(exact), *model]) == 0
    made = exact / "samples" / "00000.png"
    assert txt2img.run(["--regenerate", str(made), "--outdir", str(exact)]) == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(exact / "samples" / "00001.png")))

    plain = tmp_path / "plain"  # the LoRA is really applied
    assert txt2img.run([*fast, "--n_samples", "1", "--sampler", "lcm", "--steps", "2", "--scale", "1.0",
                        "--outdir", str(plain), *model]) == 0
    assert not np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(plain / "samples" / "00000.png")))
    assert txt2img.run([*fast, "--sampler", "lcm", "--steps", "60", "--outdir", str(tmp_path / "x"), *model]) == 2
    assert txt2img.run([*fast, "--lora", str(tmp_path / "missing.safetensors"), "--outdir", str(tmp_path / "y"),
                        *model]) == 2
