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


def random_tiny(config: Path, seed: int):
    """A tiny SDXL-shaped model with every UNet and text-encoder weight re-drawn (no zero-initialised outputs)."""
    from ldm.api import build_model
    from tests.helpers import randomize_

    torch.manual_seed(seed)
    model = build_model(config).eval()
    randomize_(model.model.diffusion_model, seed=seed + 1)
    randomize_(model.conditioner, seed=seed + 2)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def tiny_xl():
    return random_tiny(TINY_XL, 0)


@pytest.fixture(scope="module")
def pipe(tiny_xl, tmp_path_factory):
    from benchmarks.peers import diffusers_sdxl_pipeline

    return diffusers_sdxl_pipeline(tiny_xl, str(TINY_XL), tmp_path_factory.mktemp("xl"))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_batched_prompts_match_diffusers_with_shared_micro_conditioning(tiny_xl, pipe):
    from ldm.generation import generate

    prompts, seeds = ["a photo of a cat", "a red house"], [5, 6]
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ref = pipe(prompts, negative_prompt=["blurry", "dark"], height=32, width=32, num_inference_steps=8,
               guidance_scale=4, latents=noise, output_type="pt", original_size=(64, 64)).images
    ours = generate(tiny_xl, prompts, seeds=seeds, negative_prompt=["blurry", "dark"], height=32, width=32, steps=8,
                    guidance_scale=4, progress=False, original_size=[64, 64])
    assert (ours - ref).abs().max().item() < 1e-5


TINY_REFINER = ROOT / "configs/tiny/tiny-sdxl-refiner.yaml"


@pytest.fixture(scope="module")
def tiny_refiner(tiny_xl):
    model = random_tiny(TINY_REFINER, 3)
    model.first_stage_model.load_state_dict(tiny_xl.first_stage_model.state_dict())  # one VAE, as in SDXL
    return model


@pytest.mark.slow
@pytest.mark.parametrize("switch", [0.8, 0.5])
def test_base_plus_refiner_ensemble_matches_diffusers(tiny_xl, tiny_refiner, pipe, tmp_path, switch):
    """Ensemble of experts: the base runs the high-noise part of one schedule (diffusers' denoising_end), the
    refiner the rest from the base's noisy latents (denoising_start), with its own text encoder and aesthetic
    score conditioning."""
    from benchmarks.peers import diffusers_sdxl_refiner_pipeline
    from ldm.generation import generate

    tiny_refiner.first_stage_model.load_state_dict(tiny_xl.first_stage_model.state_dict())
    refiner_pipe = diffusers_sdxl_refiner_pipeline(tiny_refiner, str(TINY_REFINER), tmp_path)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    latents = pipe("a lighthouse at dusk", height=32, width=32, num_inference_steps=10, guidance_scale=5,
                   latents=noise, denoising_end=switch, output_type="latent").images
    ref = refiner_pipe("a lighthouse at dusk", image=latents, num_inference_steps=10, guidance_scale=5,
                       denoising_start=switch, output_type="pt").images
    ours = generate(tiny_xl, ["a lighthouse at dusk"], seeds=[9], height=32, width=32, steps=10, guidance_scale=5,
                    progress=False, refiner=tiny_refiner, refiner_switch=switch)
    base_only = generate(tiny_xl, ["a lighthouse at dusk"], seeds=[9], height=32, width=32, steps=10,
                         guidance_scale=5, progress=False)
    assert ref.std() > 0.05 and (ours - base_only).abs().max() > 1e-3  # the refiner did change the image
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.slow
def test_refiner_as_img2img_matches_diffusers(tiny_xl, tiny_refiner, pipe, tmp_path):
    from benchmarks.peers import diffusers_sdxl_refiner_pipeline
    from ldm.generation import generate

    tiny_refiner.first_stage_model.load_state_dict(tiny_xl.first_stage_model.state_dict())
    refiner_pipe = diffusers_sdxl_refiner_pipeline(tiny_refiner, str(TINY_REFINER), tmp_path)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    latents = pipe("a red car", height=32, width=32, num_inference_steps=10, guidance_scale=5, latents=noise,
                   output_type="latent").images
    # diffusers' img2img noises the input with the generator's noise; ours with the seed's: give both the same.
    generator = torch.Generator().manual_seed(4)
    ref = refiner_pipe("a red car", image=latents, num_inference_steps=10, strength=0.3, guidance_scale=5,
                       output_type="pt", generator=generator, aesthetic_score=7.0).images
    ours = generate(tiny_xl, ["a red car"], seeds=[4], height=32, width=32, steps=10, guidance_scale=5,
                    progress=False, refiner=tiny_refiner, refiner_strength=0.3, aesthetic_score=7.0)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def xl_files(tiny_xl, tiny_refiner, tmp_path_factory):
    from ldm.api import save_model

    base = tmp_path_factory.mktemp("xl-files")
    tiny_refiner.first_stage_model.load_state_dict(tiny_xl.first_stage_model.state_dict())
    save_model(tiny_xl, base / "base.safetensors")
    save_model(tiny_refiner, base / "refiner.safetensors")
    return base


def _script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_sdxl_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scripts_run_sdxl_with_refiner_and_regenerate_bit_for_bit(xl_files, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from ldm.image_io import read_metadata

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    txt2img = _script("txt2img")
    out = tmp_path / "out"
    argv = ["--prompt", "a lighthouse", "--H", "32", "--W", "32", "--ddim_steps", "10", "--n_samples", "1",
            "--n_iter", "1", "--config", str(TINY_XL), "--ckpt", str(xl_files / "base.safetensors"),
            "--refiner", str(xl_files / "refiner.safetensors"), "--refiner-config", str(TINY_REFINER),
            "--high-noise-frac", "0.7", "--original_size", "64,48", "prompt_2=a tall lighthouse", "--outdir", str(out)]
    assert txt2img.run(argv) == 0
    png = out / "samples" / "00000.png"
    meta = read_metadata(png)
    assert meta["refiner_switch"] == 0.7 and meta["original_size"] == [64, 48] and meta["prompt_2"] == "a tall lighthouse"
    assert meta["refiner_ckpt"].endswith("refiner.safetensors") and len(meta["refiner_sha256"]) == 64
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(out)]) == 0
    again = out / "samples" / "00001.png"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))
    plain = tmp_path / "plain"
    assert txt2img.run([*argv[:argv.index("--refiner")], "--outdir", str(plain)]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain / "samples" / "00000.png")), np.asarray(Image.open(png)))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_scripts_run_on_sdxl(xl_files, tmp_path, monkeypatch, task):
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    extra = ["--strength", "0.6"] if task == "img2img" else ["--mask", str(tmp_path / "mask.png")]
    argv = ["--prompt", "a stone wall", "--init-img", str(tmp_path / "init.png"), *extra, "--ddim_steps", "8",
            "--n_samples", "1", "--n_iter", "1", "--config", str(TINY_XL), "--ckpt", str(xl_files / "base.safetensors"),
            "--refiner", str(xl_files / "refiner.safetensors"), "--refiner-config", str(TINY_REFINER),
            "--outdir", str(tmp_path / "out")]
    assert _script(task).run(argv) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "samples" / "00000.png")).astype(float)
    if task == "inpaint":  # outside the mask the image is kept (latent blending; VAE round trip aside)
        init = np.asarray(Image.open(tmp_path / "init.png")).astype(float)
        assert out.shape == init.shape


@pytest.mark.slow
def test_main_py_trains_an_sdxl_model_with_micro_conditioning_and_exports_it(tmp_path):
    import os

    from ldm.api import load_model
    from ldm.generation import generate

    from tests.helpers import run_main_py

    res = run_main_py(["experiment=tiny_sdxl", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_steps=3",
                       "checkpoint.every_n_train_steps=3", "progress_refresh=0"], cwd=tmp_path,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "run" / "export"
    model = load_model(export / "config.yaml", export / "model.safetensors")
    assert type(model).__name__ == "DiffusionEngine"
    images = generate(model, ["a handwritten digit seven"], seeds=[0], height=16, width=16, steps=4, progress=False)
    assert images.shape == (1, 3, 16, 16)


def test_data_items_carry_micro_conditioning_and_it_reaches_the_vector(tmp_path):
    from PIL import Image

    from ldm.data.digits import DigitsDataset
    from ldm.data.image_folder import ImageFolderDataset

    item = DigitsDataset(split="train", size=16)[0]
    assert item["original_size_as_tuple"].tolist() == [8, 8] and item["target_size_as_tuple"].tolist() == [16, 16]
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red image")
    got = ImageFolderDataset(tmp_path, size=16, center_crop=True)[0]
    assert got["original_size_as_tuple"].tolist() == [20, 40]  # (height, width) before resizing
    assert got["crop_coords_top_left"].tolist() == [0, 8]  # 40x20 -> 32x16, centre crop of 16 starts at 8
    model = random_tiny(TINY_XL, 5)
    batch = {"txt": ["x", "x"], "original_size_as_tuple": torch.tensor([[8, 8], [64, 64]]),
             "crop_coords_top_left": torch.zeros(2, 2), "target_size_as_tuple": torch.tensor([[16, 16], [16, 16]])}
    vector = model.conditioner(batch)["vector"]
    assert torch.equal(vector[0, :32], vector[1, :32]) and not torch.equal(vector[0, 32:48], vector[1, 32:48])


@pytest.mark.slow
def test_sdxl_lora_in_kohya_layout_loads_in_diffusers_with_the_same_images(tiny_xl, pipe, tmp_path):
    """UNet + CLIP ViT-L adapters saved as kohya writes SDXL LoRAs (CompVis UNet names, lora_te1_): diffusers'
    load_lora_weights reads the file and renders what we render; our own load_lora reads it back exactly."""
    import copy

    from safetensors.torch import load_file

    from ldm.generation import generate
    from ldm.lora import add_lora, load_lora, lora_state_dict, save_lora
    from tests.test_lora import randomize_lora_

    model = copy.deepcopy(tiny_xl)
    add_lora(model, unet_targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                  "ff.net.2", "in_layers.2", "out_layers.3"), text_encoder=True)
    randomize_lora_(model, seed=9)
    path = save_lora(model, tmp_path / "lora.safetensors")
    modules = {k.split(".")[0] for k in load_file(str(path))}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in modules)
    local = copy.deepcopy(pipe)
    local.set_progress_bar_config(disable=True)
    local.load_lora_weights(str(path))
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = local("a cat", height=32, width=32, num_inference_steps=4, guidance_scale=5, latents=noise,
                output_type="pt").images
    ours = generate(model, ["a cat"], seeds=[5], height=32, width=32, steps=4, guidance_scale=5, progress=False)
    plain = generate(tiny_xl, ["a cat"], seeds=[5], height=32, width=32, steps=4, guidance_scale=5, progress=False)
    assert (ours - plain).abs().max() > 0.05 and (ours - ref).abs().max().item() < 1e-4
    again = copy.deepcopy(tiny_xl)
    load_lora(again, path)
    saved = lora_state_dict(model)
    assert all(torch.equal(v, lora_state_dict(again)[k]) for k, v in saved.items())
