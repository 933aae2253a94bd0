"""diffusers pipeline folders, both ways: load_model reads them, ckpt_tool convert writes and reads them.

* Round trips CompVis file -> diffusers folder -> CompVis file are bit-identical (every key, every tensor), and
  diffusers' own pipeline, loading the folder we wrote, draws the images our model draws.
* Folders written by diffusers' save_pretrained (tiny random pipelines built from diffusers' classes, as
  diffusers' tests build them) load with load_model and sample what diffusers' pipeline samples from them.
* Wrong or incomplete folders, and a missing diffusers, fail in one line.
"""
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import randomize_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = {name: ROOT / "configs" / "tiny" / f"{name}.yaml"
        for name in ("tiny-sd1", "tiny-sd2-v", "tiny-sdxl", "tiny-sdxl-refiner", "tiny-sd1-inpainting")}
TXT2IMG = ("tiny-sd1", "tiny-sd2-v", "tiny-sdxl")  # these are also sampled by diffusers from the folder we wrote
MAX_DIFF = 1e-5  # images in [0, 1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose much when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(config: Path, seed: int) -> torch.nn.Module:
    """A tiny model with every weight re-drawn at a normal scale (no zero-initialised outputs)."""
    from ldm.api import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    randomize_(model, seed=seed + 1)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


def ckpt_tool(*argv) -> int:
    from ldm.ckpt_tool import main

    return main([str(a) for a in argv])


def diffusers_images(folder: Path, prompt: str, seed: int, negative: str = "blurry") -> torch.Tensor:
    """diffusers' own pipeline, loaded from ``folder``, from the noise our seed gives: DDIM for SD 1.x/2.x, the
    folder's Euler for SDXL."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipe.scheduler, (diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler)):
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                             set_alpha_to_one=False, timestep_spacing="leading")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return pipe(prompt, negative_prompt=negative or None, height=32, width=32, num_inference_steps=6,
                guidance_scale=5, latents=latents, output_type="pt").images


def our_images(model: torch.nn.Module, prompt: str, seed: int, negative: str = "blurry") -> torch.Tensor:
    from ldm.generation import generate

    xl = type(model).__name__ == "DiffusionEngine"  # SDXL folders come with Euler, "leading" spacing
    return generate(model, [prompt], seeds=[seed], negative_prompt=negative, height=32, width=32, steps=6,
                    guidance_scale=5, sampler="euler" if xl else "ddim", discretization="leading" if xl else None,
                    progress=False)


@pytest.mark.parametrize("name", sorted(TINY))
def test_compvis_file_to_diffusers_folder_and_back_is_bit_identical(name, tmp_path):
    from ldm.api import save_model
    from ldm.checkpoint import read_state_dict

    model = tiny_model(TINY[name], seed=3)
    save_model(model, tmp_path / "a.safetensors")
    assert ckpt_tool("convert", tmp_path / "a.safetensors", tmp_path / "folder", "--config", TINY[name]) == 0
    assert ckpt_tool("convert", tmp_path / "folder", tmp_path / "b.safetensors") == 0
    a, b = read_state_dict(tmp_path / "a.safetensors"), read_state_dict(tmp_path / "b.safetensors")
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    if name not in TXT2IMG:
        return
    # and diffusers reads the folder we wrote as the same model
    ref = diffusers_images(tmp_path / "folder", "a red house", seed=5)
    ours = our_images(model, "a red house", seed=5)
    print(f"{name}: diffusers on our folder vs ours, max abs diff {(ours - ref).abs().max().item():.1e}")
    assert ref.std() > 0.05 and (ours - ref).abs().max().item() < MAX_DIFF


BUNDLED = ("v1-inference", "v1-lcm-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v", "v2-inpainting-inference",
           "sdxl-base", "sdxl-refiner")


@pytest.mark.parametrize("name", BUNDLED)
def test_full_size_configs_map_onto_diffusers_classes_and_back(name):
    """On the meta device: the diffusers components of each bundled config take exactly the converted keys and
    shapes, and their configs (as a folder would hold them) give back the very same bundled config."""
    from omegaconf import OmegaConf

    from ldm.api import load_config
    from ldm.diffusers_config import FolderConfigs, config_from_folder, diffusers_configs
    from ldm.diffusers_convert import empty_model
    from ldm.diffusers_keys import KeyMap, text_slots

    node = load_config(f"configs/stable-diffusion/{name}.yaml")
    model = empty_model(node)
    slots = text_slots(model)
    configs = diffusers_configs(model, node, slots)
    keys = KeyMap(model, slots, configs["unet"], configs["vae"])
    with torch.device("meta"):
        modules = {"unet": diffusers.UNet2DConditionModel(**configs["unet"]),
                   "vae": diffusers.AutoencoderKL(**configs["vae"])}
        for slot in slots:
            fields = dict(configs[slot.component])
            modules[slot.component] = getattr(transformers, fields.pop("class"))(transformers.CLIPTextConfig(**fields))
    for component, module in modules.items():
        own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k if k in own else k.removeprefix("text_model."): v for k, v in keys.expected[component].items()} == own
    scheduler_name, scheduler_kwargs = configs["scheduler"]
    texts = {slot.component: {k: v for k, v in configs[slot.component].items() if k != "class"} for slot in slots}
    folder = FolderConfigs("folder", {}, configs["unet"], configs["vae"],
                           dict(getattr(diffusers, scheduler_name)(**scheduler_kwargs).config),
                           texts.get("text_encoder"), texts.get("text_encoder_2"))
    assert OmegaConf.to_container(config_from_folder(folder)) == OmegaConf.to_container(node)
    unused = {k.rsplit(".", 1)[-1] if "resblocks" not in k else "last layer" for k in keys.shapes
              if k not in keys.covered and k.startswith(("cond_stage_model.", "conditioner."))}
    assert unused == ({"logit_scale", "text_projection", "last layer"} if name.startswith("v2") else
                      {"logit_scale"} if name.startswith("sdxl") else set())


# ---- folders written by diffusers ---------------------------------------------------------------------------
def _tokenizer(tmp: Path, pad: str):
    from benchmarks.peers import write_hf_clip_tokenizer_files

    folder = write_hf_clip_tokenizer_files(tmp / f"tok-{'eos' if pad != '!' else 'bang'}")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token=pad, model_max_length=77)


def _text_encoder(cls, act: str, seed: int, **extra):
    config = transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                                         vocab_size=49408, hidden_act=act, layer_norm_eps=1e-5, **extra)
    torch.manual_seed(seed)
    return randomize_(cls(config).eval(), seed)


def _vae(seed: int):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    return randomize_(vae.eval(), seed)


def _unet(seed: int, **config):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=4,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **config)
    randomize_(unet.eval(), seed)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
    return unet


def _ddim(prediction: str = "epsilon"):
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading", prediction_type=prediction)


def write_sd_pipeline(folder: Path, family: str) -> Path:
    """A tiny random StableDiffusionPipeline saved by diffusers: SD 1.x (CLIP, eps) or SD 2.x (OpenCLIP, v)."""
    sd2 = family == "sd2-v"
    unet = _unet(10, cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 2, use_linear_projection=sd2)
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet, vae=_vae(11),
        text_encoder=_text_encoder(transformers.CLIPTextModel, "gelu" if sd2 else "quick_gelu", 12),
        tokenizer=_tokenizer(folder.parent, "!" if sd2 else "<|endoftext|>"),
        scheduler=_ddim("v_prediction" if sd2 else "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def write_sdxl_pipeline(folder: Path) -> Path:
    """A tiny random StableDiffusionXLPipeline saved by diffusers (configs as diffusers' SDXL tests use)."""
    unet = _unet(20, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                 projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear", steps_offset=1,
                                                 timestep_spacing="leading", interpolation_type="linear")
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=unet, vae=_vae(21), scheduler=scheduler,
        text_encoder=_text_encoder(transformers.CLIPTextModel, "gelu", 22, projection_dim=32),
        text_encoder_2=_text_encoder(transformers.CLIPTextModelWithProjection, "gelu", 23, projection_dim=32),
        tokenizer=_tokenizer(folder.parent, "<|endoftext|>"), tokenizer_2=_tokenizer(folder.parent, "!"),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffusers-written")
    return {"sd1": write_sd_pipeline(base / "sd1", "sd1"), "sd2-v": write_sd_pipeline(base / "sd2-v", "sd2-v")}


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_folder_saved_by_diffusers_samples_like_diffusers(sd_folders, family):
    from ldm.api import load_model

    model = load_model(None, sd_folders[family])
    assert model.parameterization == ("v" if family == "sd2-v" else "eps")
    for prompt, seed in [("a photo of a cat", 1), ("Hello, world. A red house, 2 dogs?", 2)]:
        ref = diffusers_images(sd_folders[family], prompt, seed)
        ours = our_images(model, prompt, seed)
        print(f"{family} '{prompt}': max abs diff {(ours - ref).abs().max().item():.1e}")
        assert ref.std() > 0.05 and (ours - ref).abs().max().item() < MAX_DIFF


def test_sdxl_folder_saved_by_diffusers_samples_like_diffusers(tmp_path):
    from ldm.api import load_model

    folder = write_sdxl_pipeline(tmp_path / "sdxl")
    model = load_model(folder)
    assert type(model).__name__ == "DiffusionEngine"
    for negative, seed in [("blurry", 3), ("", 4)]:
        ref = diffusers_images(folder, "a lighthouse at dusk", seed, negative)
        ours = our_images(model, "a lighthouse at dusk", seed, negative)
        print(f"sdxl (Euler) negative={negative!r}: max abs diff {(ours - ref).abs().max().item():.1e}")
        assert ref.std() > 0.05 and (ours - ref).abs().max().item() < MAX_DIFF


def test_fp16_variant_and_bin_weights_load(sd_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    from ldm.api import load_model

    folder = shutil.copytree(sd_folders["sd1"], tmp_path / "variant")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() for k, v in load_file(str(unet_file)).items()}
    save_file(half, str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    unet_file.unlink()
    te_file = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(te_file)), folder / "text_encoder" / "pytorch_model.bin")
    te_file.unlink()
    full = load_model(None, sd_folders["sd1"])
    mixed = load_model(None, folder)
    for (key, a), b in zip(full.state_dict().items(), mixed.state_dict().values()):
        expected = a.half().float() if key.startswith("model.diffusion_model.") else a
        assert torch.equal(expected, b), key


def test_sampling_scripts_take_a_folder_as_ckpt(sd_folders, tmp_path, monkeypatch, txt2img):
    import numpy as np
    from PIL import Image

    from ldm.image_io import read_metadata

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--prompt", "a lighthouse", "--H", "32", "--W", "32", "--ddim_steps", "4", "--n_samples", "1",
            "--n_iter", "1", "--ckpt", str(sd_folders["sd1"]), "--outdir", str(out)]
    assert txt2img.run(argv) == 0
    png = out / "samples" / "00000.png"
    meta = read_metadata(png)
    assert meta["ckpt"] == str(sd_folders["sd1"]) and meta["config"] == str(sd_folders["sd1"])
    assert len(meta["model_sha256"]) == 64
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "00001.png")), np.asarray(Image.open(png)))


# ---- one-line errors -----------------------------------------------------------------------------------------
def _one_line_error(capsys, *argv) -> str:
    assert ckpt_tool(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_wrong_or_incomplete_folders_fail_in_one_line(sd_folders, tmp_path, capsys):
    from ldm.api import load_model
    from ldm.checkpoint import CheckpointError

    plain = tmp_path / "plain"
    plain.mkdir()
    assert "no model_index.json" in _one_line_error(capsys, "convert", plain, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_model(None, plain)
    no_unet = shutil.copytree(sd_folders["sd1"], tmp_path / "no-unet")
    shutil.rmtree(no_unet / "unet")
    assert "unet/ is missing" in _one_line_error(capsys, "convert", no_unet, tmp_path / "x.safetensors")
    no_weights = shutil.copytree(sd_folders["sd1"], tmp_path / "no-weights")
    (no_weights / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "has no weights" in _one_line_error(capsys, "convert", no_weights, tmp_path / "x.safetensors")
    extra = shutil.copytree(sd_folders["sd1"], tmp_path / "extra-key")
    from safetensors.torch import load_file, save_file

    path = extra / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["stray.weight"] = torch.zeros(1)
    del state["conv_in.bias"]
    save_file(state, str(path))
    err = _one_line_error(capsys, "convert", extra, tmp_path / "x.safetensors")
    assert "1 missing (conv_in.bias)" in err and "1 unexpected (stray.weight)" in err
    assert not (tmp_path / "x.safetensors").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    model_file = tmp_path / "m.safetensors"
    from ldm.api import save_model

    save_model(tiny_model(TINY["tiny-sd1"], seed=0), model_file)
    assert "already exists" in _one_line_error(capsys, "convert", model_file, taken, "--config", TINY["tiny-sd1"])
    assert "pass the matching --config" in _one_line_error(capsys, "convert", model_file, tmp_path / "new")


def test_missing_diffusers_gives_a_one_line_hint(sd_folders, tmp_path, monkeypatch, capsys):
    from ldm.api import load_model
    from ldm.checkpoint import CheckpointError

    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # "import diffusers" now raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install diffusers$"):
        load_model(None, sd_folders["sd1"])
    err = _one_line_error(capsys, "convert", sd_folders["sd1"], tmp_path / "x.safetensors")
    assert err.endswith("pip install diffusers")
