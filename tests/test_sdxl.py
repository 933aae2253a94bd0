"""SDXL: the published sgm YAMLs and our configs build the official architectures; parts agree with diffusers."""
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ldm.aliases import TARGET_ALIASES
from ldm.util import instantiate_from_config
from tests.test_manifests import read_manifest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "stable-diffusion"
# manifest: (UNet, VAE, text encoders, total parameters), from the reference README
COUNTS = {"sdxl-base": (2_567_463_684, 83_653_863, 123_060_480 + 694_659_841, 3_468_837_868),
          "sdxl-refiner": (2_259_526_660, 83_653_863, 694_659_841, 3_037_840_364)}


def as_published(node):
    """Our config with every target spelled as Stability's sgm YAMLs spell it (sgm.*), where one exists."""
    reverse = {ours: theirs for theirs, ours in TARGET_ALIASES.items()}
    if isinstance(node, dict):
        return {k: (reverse.get(v, v) if k == "target" else as_published(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [as_published(v) for v in node]
    return node


@pytest.mark.parametrize("manifest", sorted(COUNTS))
@pytest.mark.parametrize("spelling", ["ours", "sgm"])
def test_meta_build_matches_manifest(reference_dir, manifest, spelling):
    cfg = yaml.safe_load((CONFIGS / f"{manifest}.yaml").read_text())["model"]
    if spelling == "sgm":
        cfg = as_published(cfg)
        assert cfg["target"] == "sgm.models.diffusion.DiffusionEngine"
        assert cfg["params"]["conditioner_config"]["target"] == "sgm.modules.GeneralConditioner"
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.create(cfg))
    expected = read_manifest(reference_dir / f"{manifest}.tsv")
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [] and sorted(set(got) - set(expected)) == []
    assert {k: got[k] for k in expected if got[k] != expected[k]} == {}
    unet, vae, text, total = COUNTS[manifest]
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert numel(model.model.diffusion_model) == unet and numel(model.first_stage_model) == vae
    assert numel(model.conditioner) == text and numel(model) == total


TINY_XL = ROOT / "configs/tiny/tiny-sdxl.yaml"


@pytest.fixture(scope="module")
def tiny_xl():
    from ldm.api import build_model
    from tests.helpers import randomize_

    torch.manual_seed(0)
    model = build_model(TINY_XL).eval()
    randomize_(model.model.diffusion_model, seed=1)
    randomize_(model.conditioner, seed=2)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def pipe(tiny_xl, tmp_path_factory):
    from benchmarks.peers import diffusers_sdxl_pipeline

    return diffusers_sdxl_pipeline(tiny_xl, str(TINY_XL), tmp_path_factory.mktemp("xl"))


def test_text_encoders_match_diffusers(tiny_xl, pipe):
    from ldm.generation import encode_sdxl
    from ldm.settings import SamplingSettings

    # No "!": diffusers' SDXL tokenizer_2 declares "!" its pad token, so a literal "!" becomes id 0 there,
    # while Stability's reference (open_clip's tokenizer, which we follow) encodes it as a word (256).
    prompts = ["a photo of a cat", "Hello, world. A red house, 2 dogs?"]
    ours, _ = encode_sdxl(tiny_xl, prompts, ["", ""], SamplingSettings(), 32, 32)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert (ours["crossattn"] - embeds).abs().max() < 1e-5
    assert (ours["vector"][:, :pooled.shape[1]] - pooled).abs().max() < 1e-5
    assert pooled.std() > 0.1 and embeds.std() > 0.1


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_whole_txt2img_matches_diffusers_sdxl_pipeline(tiny_xl, pipe, negative):
    """Both text encoders (a second prompt for the second), pooled + micro-conditioning vector (non-default
    sizes and crops, and their negative counterparts), guidance, DDIM, VAE: the same images as diffusers'
    StableDiffusionXLPipeline. One prompt per call: with a batch, diffusers repeats its (negative, positive)
    time-id pair per prompt, which misaligns them with its [negatives..., positives...] embeddings."""
    from ldm.generation import generate

    micro = dict(original_size=(48, 40), crops_coords_top_left=(4, 2), target_size=(32, 32),
                 negative_original_size=(16, 24), negative_crops_coords_top_left=(0, 8), negative_target_size=(40, 32))
    for prompt, seed in [("a photo of a cat", 5), ("a red house", 6)]:
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
        ref = pipe(prompt, negative_prompt=negative or None, prompt_2="another prompt", height=32, width=32,
                   num_inference_steps=8, guidance_scale=5, latents=noise, output_type="pt", **micro).images
        ours = generate(tiny_xl, [prompt], seeds=[seed], negative_prompt=negative, prompt_2="another prompt", height=32,
                        width=32, steps=8, guidance_scale=5, progress=False, **{k: list(v) for k, v in micro.items()})
        assert ref.std() > 0.05
        assert (ours - ref).abs().max().item() < 1e-5


def test_batched_prompts_match_diffusers_with_shared_micro_conditioning(tiny_xl, pipe):
    from ldm.generation import generate

    prompts, seeds = ["a photo of a cat", "a red house"], [5, 6]
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ref = pipe(prompts, negative_prompt=["blurry", "dark"], height=32, width=32, num_inference_steps=8,
               guidance_scale=4, latents=noise, output_type="pt", original_size=(64, 64)).images
    ours = generate(tiny_xl, prompts, seeds=seeds, negative_prompt=["blurry", "dark"], height=32, width=32, steps=8,
                    guidance_scale=4, progress=False, original_size=[64, 64])
    assert (ours - ref).abs().max().item() < 1e-5
