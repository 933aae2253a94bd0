"""Peer implementations built from our weights, for benchmarks and parity tests (diffusers, transformers).

Nothing here is downloaded: diffusers models come from our state dicts through diffusers' own
single-file conversion utilities, and the HF CLIP tokenizer from open_clip's shipped BPE table.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf


def write_hf_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json + merges.txt of OpenAI's CLIP BPE (derived from the table open_clip ships) in ``folder``."""
    import shutil

    from ldm.modules.encoders.tokenizer import _tokenizer_folder

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(_tokenizer_folder()) / name, folder / name)
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


def _sdxl_parts(model: torch.nn.Module, config_path: str, work: Path) -> dict:
    """diffusers components holding exactly the weights of our SDXL ``DiffusionEngine`` (base or refiner),
    converted by diffusers' single-file utilities; tiny models keep SDXL's "text_time" embedding."""
    import diffusers
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    original = {"model": {"params": OmegaConf.to_container(OmegaConf.load(config_path).model.params, resolve=True)}}
    sd = model.state_dict()
    ucfg = sf.create_unet_diffusers_config_from_ldm(original, sd)
    micro = next(e for e in model.conditioner.embedders if hasattr(e, "outdim"))
    ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=micro.outdim)
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    vcfg = sf.create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=model.scale_factor)
    vae = diffusers.AutoencoderKL(**vcfg)
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    encoders = model.conditioner.text_encoders()
    parts = {"vae": vae.eval(), "unet": unet.eval(), "text_encoder": None, "tokenizer": None}
    tokenizer = hf_clip_tokenizer(work / "tokenizer")
    if len(encoders) == 2:
        clip = encoders[0]
        text = CLIPTextModel(clip.transformer.text_model.config)
        prefix = "conditioner.embedders.0.transformer.text_model."
        missing, unexpected = text.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                                   strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        parts.update(text_encoder=text.eval(), tokenizer=tokenizer)
    index = len(encoders) - 1  # the OpenCLIP embedder: last of the text encoders
    oc = encoders[-1].model
    width, layers = oc.positional_embedding.shape[1], len(oc.transformer.resblocks)
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=oc.token_embedding.num_embeddings, hidden_size=width, projection_dim=oc.text_projection.shape[1],
        intermediate_size=oc.transformer.resblocks[0].mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=oc.transformer.resblocks[0].attn.num_heads, max_position_embeddings=77, hidden_act="gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
    converted = sf.convert_open_clip_checkpoint(text_2, sd, prefix=f"conditioner.embedders.{index}.model.")
    own = set(text_2.state_dict())
    converted = {(k if k in own else k.removeprefix("text_model.")): v for k, v in converted.items()}
    missing, unexpected = text_2.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    parts.update(text_encoder_2=text_2.eval(),
                 tokenizer_2=CLIPTokenizer.from_pretrained(str(work / "tokenizer"), pad_token="!", model_max_length=77))
    return parts


def _ddim():
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading")


def diffusers_sdxl_pipeline(model: torch.nn.Module, config_path: str, work: Path, scheduler=None):
    """A diffusers StableDiffusionXLPipeline with exactly the weights of our SDXL base ``model``."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline(**_sdxl_parts(model, config_path, work), scheduler=scheduler or _ddim(),
                                               force_zeros_for_empty_prompt=True, add_watermarker=False)


def diffusers_sdxl_refiner_pipeline(model: torch.nn.Module, config_path: str, work: Path, scheduler=None):
    """A diffusers StableDiffusionXLImg2ImgPipeline with exactly the weights of our SDXL refiner ``model``."""
    import diffusers

    return diffusers.StableDiffusionXLImg2ImgPipeline(
        **_sdxl_parts(model, config_path, work), scheduler=scheduler or _ddim(), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
