"""Peer implementations built from our weights, for benchmarks and parity tests (diffusers, transformers).

Nothing here is downloaded: diffusers models come from our state dicts through diffusers' own
single-file conversion utilities, and the HF CLIP tokenizer from open_clip's shipped BPE table.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf


def write_hf_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt of OpenAI's CLIP BPE, derived from the table open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def hf_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_hf_clip_tokenizer_files(folder)), pad_token="<|endoftext|>", model_max_length=77)


def diffusers_sd1_pipeline(model: torch.nn.Module, config_path: str, work: Path, scheduler=None):
    """A diffusers StableDiffusionPipeline with exactly the weights of our SD 1.x ``model``."""
    import diffusers
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextModel

    original = {"model": {"params": OmegaConf.to_container(OmegaConf.load(config_path).model.params, resolve=True)}}
    sd = model.state_dict()
    ucfg = sf.create_unet_diffusers_config_from_ldm(original, sd)
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    vcfg = sf.create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=model.scale_factor)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    ours_text = model.cond_stage_model.transformer.text_model
    text = CLIPTextModel(ours_text.config)
    prefix = "cond_stage_model.transformer.text_model."
    text.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
    scheduler = scheduler or diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text.eval(), tokenizer=hf_clip_tokenizer(work / "tokenizer"), unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
