"""Our samplers against diffusers' schedulers: same random model, same noise, same conditioning.

diffusers is configured as CompVis ran Stable Diffusion: scaled_linear betas from the config,
"leading" spacing with steps_offset=1, set_alpha_to_one=False, no clipping.
"""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import DiscreteDenoiser, get_sigmas, sample
from ldm.models.diffusion.sampling.discretization import sigmas_from_timesteps
from ldm.util import instantiate_from_config
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
COMMON = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, timestep_spacing="leading")
SCALE, STEPS = 5.0, 20


@pytest.fixture(scope="module", params=["configs/tiny/tiny-sd1.yaml", "configs/tiny/tiny-sd2-v.yaml"], ids=["eps", "v"])
def setup(request):
    cfg = OmegaConf.load(request.param)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model).eval()
    randomize_(model.model.diffusion_model, seed=1)
    with torch.no_grad():  # keep the random UNet's output scale near a trained model's (eps ~ N(0, 1))
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    original = {"model": {"params": OmegaConf.to_container(cfg.model.params, resolve=True)}}
    ucfg = single_file.create_unet_diffusers_config_from_ldm(original, ckpt)
    unet = diffusers.UNet2DConditionModel(**ucfg).eval()
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    with torch.no_grad():
        c = model.get_learned_conditioning(["a photo of a cat", "a red house by the sea"])
        uc = model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    common = dict(COMMON, prediction_type=PREDICTION[model.parameterization])
    return model, unet, c, uc, x_T, common


@torch.no_grad()
def diffusers_loop(unet, scheduler, c, uc, x_T):
    # Same discretization of the same schedule; only the prediction type follows the model.
    scheduler.set_timesteps(STEPS)
    latents = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out_u, out_c = unet(inp, t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
        latents = scheduler.step(out_u + SCALE * (out_c - out_u), t, latents).prev_sample
    return latents


def test_ddim_matches_diffusers_ddim_scheduler(setup):
    model, unet, c, uc, x_T, common = setup
    ref = diffusers_loop(unet, diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False), c, uc, x_T)
    ours, _ = DDIMSampler(model).sample(S=STEPS, batch_size=2, shape=(4, 8, 8), conditioning=c, eta=0.0, x_T=x_T,
                                        unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False)
    assert ref.std() > 0.1
    print(f"DDIM ({model.parameterization}) vs diffusers: {rel_err(ours, ref):.1e}")
    assert rel_err(ours, ref) < 2e-5


@pytest.mark.parametrize("ours_name,scheduler_cls,extra", [
    ("euler", "EulerDiscreteScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
])
def test_k_samplers_match_diffusers(setup, ours_name, scheduler_cls, extra):
    model, unet, c, uc, x_T, common = setup
    scheduler = getattr(diffusers, scheduler_cls)(**common, **extra)
    ref = diffusers_loop(unet, scheduler, c, uc, x_T)
    # Same timesteps as the scheduler chose (DPMSolver's "leading" divides by steps + 1).
    timesteps = scheduler.timesteps.numpy()[::-1].copy()
    sigmas = sigmas_from_timesteps(DiscreteDenoiser(model), timesteps, final="zero")
    ours = sample(model, c, uncond=uc, guidance_scale=SCALE, sampler=ours_name, sigmas=sigmas, x_T=x_T, progress=False)
    if ours_name == "euler":  # and ours picks exactly those for its own "leading" spacing
        assert torch.equal(sigmas, get_sigmas(DiscreteDenoiser(model), "leading", STEPS, "zero"))
    print(f"{ours_name} ({model.parameterization}) vs diffusers: {rel_err(ours, ref):.1e}")
    assert rel_err(ours, ref) < 2e-5


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("steps", [8, 20])  # below 15 steps both lower the order of the last steps
def test_dpm_solver_multistep_matches_diffusers(setup, order, steps):
    from ldm.models.diffusion.sampling import solvers

    model, unet, c, uc, x_T, common = setup
    scheduler = diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=order)
    scheduler.set_timesteps(steps)
    latents = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out_u, out_c = unet(inp, t, encoder_hidden_states=torch.cat([uc, c])).sample.chunk(2)
            latents = scheduler.step(out_u + SCALE * (out_c - out_u), t, latents).prev_sample
    sigmas = sigmas_from_timesteps(DiscreteDenoiser(model), scheduler.timesteps.numpy()[::-1].copy(), final="zero")
    if order == 3:
        ours = sample(model, c, uncond=uc, guidance_scale=SCALE, sampler="dpmpp_3m", sigmas=sigmas, x_T=x_T,
                      progress=False)
    else:
        ours = sample(model, c, uncond=uc, guidance_scale=SCALE, sampler="dpmpp_2m", sigmas=sigmas, x_T=x_T,
                      progress=False, solver=lambda *a, **k: solvers.sample_dpmpp_multistep(*a, **k, order=2))
    print(f"DPM-Solver++ order {order}, {steps} steps ({model.parameterization}) vs diffusers: {rel_err(ours, latents):.1e}")
    assert latents.std() > 0.1
    assert rel_err(ours, latents) < 2e-5
    if order == 3:  # and the third order is really used: the second-order result differs
        second = sample(model, c, uncond=uc, guidance_scale=SCALE, sampler="dpmpp_2m", sigmas=sigmas, x_T=x_T,
                        progress=False)
        assert rel_err(second, latents) > 1e-4


def test_plms_relation_to_pndm(setup):
    """PLMS (CompVis) is diffusers' PNDM with skip_prk_steps=True for eps models: same warm-up, same formula.

    For v models they part: CompVis (SD 2) converts each step's v to eps and extrapolates the eps history,
    as we do; diffusers' PNDM extrapolates the raw v outputs of different timesteps and converts once.
    """
    model, unet, c, uc, x_T, common = setup
    pndm = diffusers.PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False)
    ref = diffusers_loop(unet, pndm, c, uc, x_T)
    ours, _ = PLMSSampler(model).sample(S=STEPS, batch_size=2, shape=(4, 8, 8), conditioning=c, x_T=x_T,
                                        unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False)
    err = rel_err(ours, ref)
    print(f"PLMS vs PNDM(skip_prk_steps) relative difference after {STEPS} steps: {err:.2e}")
    if model.parameterization == "eps":
        assert err < 2e-5
    else:
        assert err > 1e-3  # the documented difference, not round-off


def test_whole_txt2img_matches_diffusers_pipeline(tmp_path):
    """Prompt -> tokenizer -> text encoder -> guided DDIM -> VAE decode, end to end against
    diffusers' StableDiffusionPipeline holding the same weights and the same starting noise."""
    from benchmarks.peers import diffusers_sd1_pipeline
    from ldm.generation import generate

    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load("configs/tiny/tiny-sd1.yaml").model).eval()
    randomize_(model.model.diffusion_model, seed=1)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    pipe = diffusers_sd1_pipeline(model, "configs/tiny/tiny-sd1.yaml", tmp_path)
    prompts, seeds = ["a photo of a cat", "Hello, world! A red house."], [5, 6]
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ref = pipe(prompts, negative_prompt=["blurry", ""], height=32, width=32, num_inference_steps=10, guidance_scale=5,
               latents=noise, output_type="pt").images
    ours = generate(model, prompts, seeds=seeds, negative_prompt=["blurry", ""], height=32, width=32, steps=10,
                    guidance_scale=5, progress=False)
    assert ref.std() > 0.05
    assert (ours - ref).abs().max().item() < 1e-5
