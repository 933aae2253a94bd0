"""Guidance-distilled LCM models (diffusers' ``time_cond_proj_dim``, e.g. LCM_Dreamshaper_v7): the UNet takes the
guidance scale as an input instead of running classifier-free guidance.

* The guidance embedding is diffusers' ``get_guidance_scale_embedding``, bit for bit.
* A tiny random guidance-distilled model written as a diffusers folder samples, in diffusers' own
  ``LatentConsistencyModelPipeline`` loaded from that folder, the images our ``generate`` draws, and the folder reads
  back into the same weights, with few-step defaults.
* One UNet call per step whatever the scale, and the scale reaches the UNet.
* A full-size LCM file is recognised, and a config without the input names the fix.
"""
import pytest
import torch
from omegaconf import OmegaConf

from ldm.api import build_model, load_config
from ldm.generation import generate
from ldm.modules.diffusionmodules.util import guidance_scale_embedding
from tests.helpers import randomize_

diffusers = pytest.importorskip("diffusers")

TINY = "configs/tiny/tiny-sd1.yaml"
GUIDANCE_DIM = 16
PROMPTS, SEEDS = ["a photo of a cat", "a red house by the sea"], [5, 6]


def tiny_lcm_config(tmp_path):
    node = OmegaConf.load(TINY)
    node.model.params.unet_config.params.time_cond_proj_dim = GUIDANCE_DIM
    path = tmp_path / "tiny-lcm.yaml"
    OmegaConf.save(node, path)
    return path


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    """(model, its config path, its checkpoint path): a tiny SD 1.x whose UNet takes a guidance embedding."""
    from ldm.api import save_model

    work = tmp_path_factory.mktemp("lcm-guidance")
    config = tiny_lcm_config(work)
    torch.manual_seed(0)
    model = build_model(config).eval()
    randomize_(model.model.diffusion_model, seed=1)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    save_model(model, work / "lcm.safetensors")
    return model, config, work / "lcm.safetensors"


@pytest.mark.parametrize("dim", [256, 16, 33])
def test_guidance_embedding_is_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 3.2, 7.5, 14.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_scale_embedding(w, dim)
    assert ours.shape == ref.shape == (5, dim)
    assert torch.equal(ours, ref)


def test_unet_matches_diffusers_unet_with_timestep_cond(lcm):
    """Our UNet and diffusers' UNet2DConditionModel holding the converted weights, fed the same guidance embedding."""
    from ldm.diffusers_config import diffusers_configs
    from ldm.diffusers_keys import text_slots, to_diffusers

    model, config, _ = lcm
    node = load_config(config)
    configs = diffusers_configs(model, node, text_slots(model))
    assert configs["unet"]["time_cond_proj_dim"] == GUIDANCE_DIM
    theirs = diffusers.UNet2DConditionModel(**configs["unet"]).eval()
    parts = to_diffusers(model.state_dict(), text_slots(model), configs["unet"], configs["vae"])
    theirs.load_state_dict(parts["unet"], strict=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 259])
    w = guidance_scale_embedding(torch.tensor([7.5, 1.0]), GUIDANCE_DIM)
    unet = model.model.diffusion_model
    with torch.no_grad():
        ours = unet(x, t, context=context, timestep_cond=w)
        ref = theirs(x, t, encoder_hidden_states=context, timestep_cond=w).sample
        plain = unet(x, t, context=context)
        plain_ref = theirs(x, t, encoder_hidden_states=context).sample
    assert (ours - ref).abs().max() < 1e-5 and (plain - plain_ref).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the embedding is not a no-op
    with pytest.raises(ValueError, match="timestep_cond has shape"):
        unet(x, t, context=context, timestep_cond=w[:1])
    plain_unet = build_model(TINY).model.diffusion_model
    with pytest.raises(ValueError, match="takes no guidance embedding"):
        plain_unet(x, t, context=context, timestep_cond=w)


def test_folder_samples_what_diffusers_lcm_pipeline_samples(lcm, tmp_path):
    """File -> diffusers folder (LCM pipeline and scheduler) -> diffusers' LatentConsistencyModelPipeline, against
    our generate() on the same model: same images; the folder reads back bit for bit with lcm defaults."""
    from ldm.api import load_model
    from ldm.ckpt_tool import main as ckpt_tool
    from ldm.run_config import model_sampling_defaults

    model, config, ckpt = lcm
    folder = tmp_path / "folder"
    assert ckpt_tool(["convert", str(ckpt), str(folder), "--config", str(config)]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    assert type(pipe).__name__ == "LatentConsistencyModelPipeline"
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    for steps, scale in [(1, 8.5), (4, 8.5), (4, 3.0)]:
        ref = pipe(PROMPTS, height=32, width=32, num_inference_steps=steps, guidance_scale=scale, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
        ours = generate(model, PROMPTS, seeds=SEEDS, sampler="lcm", steps=steps, guidance_scale=scale, height=32,
                        width=32, progress=False)
        diff = (ours - ref).abs().max().item()
        print(f"{steps} steps, scale {scale}: max abs image difference {diff:.1e}")
        assert ref.std() > 0.05 and diff < 1e-5
    loaded = load_model(folder, folder)
    state, back = model.state_dict(), loaded.state_dict()
    assert sorted(state) == sorted(back)
    assert all(torch.equal(state[k], back[k]) for k in state)
    assert model_sampling_defaults(folder) == {"sampler": "lcm", "steps": 4, "guidance_scale": 8.5}


def test_one_unet_call_per_step_and_the_scale_reaches_the_unet(lcm):
    model, _, _ = lcm
    unet = model.model.diffusion_model
    calls = []
    hook = unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(
        (args[0].shape[0], kwargs.get("timestep_cond") is not None)), with_kwargs=True)
    try:
        images = {scale: generate(model, PROMPTS, seeds=SEEDS, sampler=sampler, steps=3, guidance_scale=scale,
                                  negative_prompt="blurry", height=32, width=32, progress=False)
                  for sampler, scale in [("lcm", 8.5), ("lcm", 2.0), ("ddim", 2.0)]}
    finally:
        hook.remove()
    assert calls == [(2, True)] * 9  # no unconditional half, for any sampler: the scale is an input
    first, second = images[8.5], images[2.0]
    assert (first - second).abs().max() > 1e-3


def test_full_size_lcm_file_is_recognised_and_a_wrong_config_names_the_fix():
    from ldm.checkpoint import CheckpointError, check_state_dict
    from ldm.diffusers_convert import empty_model, infer_config

    lcm_model = empty_model(load_config("configs/stable-diffusion/v1-lcm-inference.yaml"))
    state = lcm_model.state_dict()
    assert state["model.diffusion_model.time_embedding.cond_proj.weight"].shape == (320, 256)
    assert infer_config(state, "lcm.safetensors") == "configs/stable-diffusion/v1-lcm-inference.yaml"
    plain = empty_model(load_config("configs/stable-diffusion/v1-inference.yaml"))
    assert infer_config(plain.state_dict(), "sd15.safetensors") == "configs/stable-diffusion/v1-inference.yaml"
    with pytest.raises(CheckpointError, match=r"guidance-distilled \(LCM\).*time_cond_proj_dim: 256"):
        check_state_dict(plain, state)


def test_sdxl_lcm_folder_samples_what_diffusers_samples(tmp_path):
    """SDXL with a guidance input (as latent-consistency/lcm-sdxl): our folder in diffusers' SDXL pipeline with its
    LCMScheduler against generate(); the guidance embedding travels in SDXL's conditioning dict."""
    from ldm.api import save_model
    from ldm.ckpt_tool import main as ckpt_tool

    node = OmegaConf.load("configs/tiny/tiny-sdxl.yaml")
    node.model.params.network_config.params.time_cond_proj_dim = GUIDANCE_DIM
    config = tmp_path / "tiny-sdxl-lcm.yaml"
    OmegaConf.save(node, config)
    torch.manual_seed(0)
    model = build_model(config).eval()
    randomize_(model, seed=4)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    save_model(model, tmp_path / "xl.safetensors")
    assert ckpt_tool(["convert", str(tmp_path / "xl.safetensors"), str(tmp_path / "folder"), "--config",
                      str(config)]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "folder"))
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == GUIDANCE_DIM
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS[0], height=32, width=32, num_inference_steps=2, guidance_scale=6.0, output_type="pt",
               generator=torch.Generator().manual_seed(SEEDS[0])).images
    ours = generate(model, PROMPTS[:1], seeds=SEEDS[:1], sampler="lcm", steps=2, guidance_scale=6.0, height=32,
                    width=32, progress=False)
    diff = (ours - ref).abs().max().item()
    print(f"SDXL LCM, 2 steps, scale 6: max abs image difference {diff:.1e}")
    assert ref.std() > 0.05 and diff < 1e-5
