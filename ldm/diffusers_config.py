"""Our model configs <-> the component configs of a diffusers folder, for SD 1.x, 2.x (eps / v) and SDXL.

* :func:`diffusers_configs`: what diffusers' classes need for one of our models: UNet and VAE configs from
  diffusers' own ``create_unet_diffusers_config_from_ldm`` / ``create_vae_diffusers_config_from_ldm`` (plus
  SDXL's micro-conditioning), the text encoders as transformers ``CLIPTextConfig`` fields, and the scheduler and
  pipeline class of the family's official folders.
* :func:`config_from_folder`: our model config for a folder's configs: the family's bundled YAML
  (configs/stable-diffusion/), with the folder's sizes where they differ (tiny test models, other widths), its
  prediction type, noise schedule and latent scale. A full-size folder gets the bundled config unchanged.

Anything the other side cannot express (another norm group count, a clip-skip text encoder, a non
``scaled_linear`` schedule, ...) is refused in one line naming the setting.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.diffusers_keys import TextSlot, single_file_utils
from ldm.paths import CONFIG_DIR
from ldm.util import load_yaml

CLIP_PAD, OPENCLIP_PAD = "<|endoftext|>", "!"  # tokenizer pad tokens: SD 1.x pads with EOS, OpenCLIP with "!" (id 0)
_TOKENS = dict(bos_token_id=49406, eos_token_id=49407)
# UNet2DConditionModel / AutoencoderKL settings our networks have no switch for: they must keep these values.
_UNET_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "downsample_padding": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "mid_block_scale_factor": (1,), "act_fn": ("silu",),
    "norm_num_groups": (32,), "norm_eps": (1e-5,), "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "addition_embed_type": (None, "text_time"),
}
_VAE_FIXED: dict[str, tuple] = {
    "act_fn": ("silu",), "norm_num_groups": (32,), "shift_factor": (None,), "latents_mean": (None,),
    "latents_std": (None,), "use_quant_conv": (True,), "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


@dataclasses.dataclass
class FolderConfigs:
    """The parsed JSON configs of a diffusers folder (``None`` for a component it does not have)."""

    where: str  # the folder, for messages
    index: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder: Optional[dict[str, Any]] = None
    text_encoder_2: Optional[dict[str, Any]] = None


# ---- ours -> diffusers ---------------------------------------------------------------------------------------
def diffusers_configs(model: torch.nn.Module, node: DictConfig, slots: list[TextSlot]) -> dict[str, Any]:
    """unet / vae (config dicts), one CLIPTextConfig-fields dict per text encoder component, ``scheduler`` and
    ``pipeline`` as (class name, init kwargs), ``tokenizers`` as component -> pad token."""
    sf = single_file_utils()
    params = OmegaConf.to_container(node.params, resolve=True)
    original = {"model": {"params": params}}
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    unet = sf.create_unet_diffusers_config_from_ldm(original, shapes)
    sdxl = "conditioner" in dict(model.named_children())
    if sdxl:  # diffusers guesses SDXL from full-size widths only; ours says so by its micro-conditioning embedders
        micro = [e for e in model.conditioner.embedders if type(e).__name__ == "ConcatTimestepEmbedderND"]
        unet.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=micro[0].outdim)
    elif params.get("image_size"):
        unet["sample_size"] = int(params["image_size"])
    guidance_dim = getattr(model.model.diffusion_model, "time_cond_proj_dim", None)
    if guidance_dim is not None:  # diffusers' single-file utilities do not know guidance-distilled UNets
        unet["time_cond_proj_dim"] = int(guidance_dim)
    scale = float(params.get("scale_factor", 1.0))
    vae = sf.create_vae_diffusers_config_from_ldm(original, shapes, scaling_factor=scale)
    out: dict[str, Any] = {"unet": unet, "vae": vae, "tokenizers": {}}
    for slot in slots:
        out[slot.component] = _text_config(model, slot, sdxl)
        out["tokenizers"][slot.component.replace("text_encoder", "tokenizer")] = (
            CLIP_PAD if slot.kind == "clip" else OPENCLIP_PAD)
    out["scheduler"] = _scheduler(model, params, sdxl, lcm=guidance_dim is not None)
    out["pipeline"] = _pipeline(unet, slots, sdxl)
    return out


def _text_config(model: torch.nn.Module, slot: TextSlot, sdxl: bool) -> dict[str, Any]:
    encoder = model.get_submodule(slot.prefix.rstrip(".").rsplit(".", 1)[0])
    if slot.kind == "clip":
        expected = ("hidden", slot.layers - 1) if sdxl else ("last", None)  # what diffusers' pipelines feed the UNet
        got = (encoder.layer, encoder.layer_idx if encoder.layer == "hidden" else None)
        if got != expected and not (sdxl and got == ("hidden", -2)):
            raise CheckpointError(f"the CLIP text encoder's layer={got[0]!r} (layer_idx={got[1]}) has no diffusers "
                                  f"equivalent; diffusers' pipeline uses layer={expected[0]!r}")
        cfg = encoder.transformer.config
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "bos_token_id",
                "eos_token_id", "pad_token_id")
        return {"class": "CLIPTextModel", **{k: getattr(cfg, k) for k in keys}}
    oc = encoder.model
    if sdxl and (encoder.layer != "penultimate" or getattr(encoder, "legacy", True)):
        raise CheckpointError("SDXL's OpenCLIP encoder must use layer: penultimate and legacy: False, "
                              "as diffusers does")
    block = oc.transformer.resblocks[0]
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    fields = dict(vocab_size=oc.token_embedding.num_embeddings, hidden_size=slot.width,
                  intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=slot.layers - slot.dropped,
                  num_attention_heads=block.attn.num_heads, max_position_embeddings=oc.positional_embedding.shape[0],
                  hidden_act="quick_gelu" if quick else "gelu", layer_norm_eps=1e-5,
                  projection_dim=oc.text_projection.shape[1], pad_token_id=0, **_TOKENS)
    return {"class": "CLIPTextModelWithProjection" if slot.projection else "CLIPTextModel", **fields}


def _scheduler(model: torch.nn.Module, params: Mapping[str, Any], sdxl: bool,
               lcm: bool = False) -> tuple[str, dict[str, Any]]:
    """The scheduler of the family's official folders (``lcm``: of LCM models' folders), with our noise schedule
    and prediction type."""
    if sdxl:
        disc = params["denoiser_config"].get("params", {}).get("discretization_config", {}).get("params", {})
        start, end = disc.get("linear_start", 0.00085), disc.get("linear_end", 0.012)
        steps = disc.get("num_timesteps", 1000)
        scaling = params["denoiser_config"]["params"]["scaling_config"]["target"].rsplit(".", 1)[-1]
        prediction = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}.get(scaling)
    else:
        if params.get("beta_schedule", "linear") != "linear":
            raise CheckpointError(f"beta_schedule {params['beta_schedule']!r} has no diffusers equivalent "
                                  "(CompVis' 'linear' is diffusers' 'scaled_linear')")
        start, end = params.get("linear_start", 1e-4), params.get("linear_end", 2e-2)
        steps = params.get("timesteps", 1000)
        prediction = {"eps": "epsilon", "v": "v_prediction"}.get(getattr(model, "parameterization", "eps"))
    if prediction is None:
        raise CheckpointError("only eps- and v-prediction models have a diffusers scheduler config")
    common = dict(num_train_timesteps=int(steps), beta_start=float(start), beta_end=float(end),
                  beta_schedule="scaled_linear", prediction_type=prediction, steps_offset=1)
    if lcm:  # a guidance-distilled model samples in a few consistency steps (its folders' scheduler)
        return "LCMScheduler", dict(common, original_inference_steps=50, clip_sample=False, set_alpha_to_one=True)
    if sdxl:
        return "EulerDiscreteScheduler", dict(common, timestep_spacing="leading", interpolation_type="linear")
    if prediction == "v_prediction":
        return "DDIMScheduler", dict(common, clip_sample=False, set_alpha_to_one=False)
    return "PNDMScheduler", dict(common, skip_prk_steps=True, set_alpha_to_one=False)


def _pipeline(unet: Mapping[str, Any], slots: list[TextSlot], sdxl: bool) -> tuple[str, dict[str, Any]]:
    inpaint = unet["in_channels"] == 9
    if sdxl:
        if inpaint:
            raise CheckpointError("SDXL inpainting models are not supported in diffusers folders here")
        if len(slots) == 1:
            return "StableDiffusionXLImg2ImgPipeline", dict(requires_aesthetics_score=True,
                                                            force_zeros_for_empty_prompt=False, add_watermarker=False)
        return "StableDiffusionXLPipeline", dict(force_zeros_for_empty_prompt=True, add_watermarker=False)
    if unet.get("time_cond_proj_dim") is not None and not inpaint:
        return "LatentConsistencyModelPipeline", dict(safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False)
    name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    return name, dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---- diffusers -> ours ---------------------------------------------------------------------------------------
def with_defaults(cls_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A component config completed with its diffusers class's defaults (diffusers' own rule for absent keys)."""
    import diffusers

    signature = inspect.signature(getattr(diffusers, cls_name).__init__)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def config_from_folder(cfgs: FolderConfigs) -> DictConfig:
    """Our model config (the ``model`` node) for a diffusers folder's configs."""
    where = cfgs.where
    unet = with_defaults("UNet2DConditionModel", cfgs.unet)
    _check_fixed(unet, _UNET_FIXED, f"{where}/unet/config.json")
    prediction = PREDICTIONS.get(cfgs.scheduler.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{where}/scheduler: prediction_type {cfgs.scheduler.get('prediction_type')!r} is not "
                              "supported; use epsilon or v_prediction")
    if unet["addition_embed_type"] == "text_time":
        node = _sdxl_node(cfgs, unet, prediction)
        network = node.params.network_config.params
    else:
        node = _sd_node(cfgs, unet, prediction)
        network = node.params.unet_config.params
    _apply_unet(network, unet, where)
    _apply_vae(node.params, with_defaults("AutoencoderKL", cfgs.vae), f"{where}/vae/config.json")
    return node


def _template(name: str) -> DictConfig:
    return load_yaml(CONFIG_DIR / "stable-diffusion" / f"{name}.yaml").model


def _sd_node(cfgs: FolderConfigs, unet: dict[str, Any], prediction: str) -> DictConfig:
    te = cfgs.text_encoder
    if te is None:
        raise CheckpointError(f"{cfgs.where} has no text_encoder (model_index.json); SD 1.x/2.x folders need one")
    inpaint = unet["in_channels"] == 9
    act = te.get("hidden_act", "quick_gelu")
    if act == "quick_gelu":  # OpenAI CLIP: SD 1.x
        node = _template("v1-inpainting-inference" if inpaint else "v1-inference")
        _apply_clip(node.params.cond_stage_config, te)
    elif act == "gelu":  # OpenCLIP, whose penultimate layer diffusers' SD 2 folders keep as their last
        name = "v2-inpainting-inference" if inpaint else ("v2-inference-v" if prediction == "v" else "v2-inference")
        node = _template(name)
        _apply_openclip(node.params.cond_stage_config, te, extra_layers=1, embed_dim=te.get("projection_dim"))
    else:
        raise CheckpointError(f"{cfgs.where}/text_encoder: hidden_act {act!r} matches neither CLIP (quick_gelu) "
                              "nor OpenCLIP (gelu)")
    if prediction == "v":
        node.params.parameterization = "v"
    else:
        node.params.pop("parameterization", None)
    sched = cfgs.scheduler
    _check_schedule(sched, cfgs.where)
    _put(node.params, "linear_start", float(sched.get("beta_start", 0.0001)))
    _put(node.params, "linear_end", float(sched.get("beta_end", 0.02)))
    _put(node.params, "timesteps", int(sched.get("num_train_timesteps", 1000)))
    return node


def _sdxl_node(cfgs: FolderConfigs, unet: dict[str, Any], prediction: str) -> DictConfig:
    where, te, te2 = cfgs.where, cfgs.text_encoder, cfgs.text_encoder_2
    if te2 is None:
        raise CheckpointError(f"{where} has no text_encoder_2 (model_index.json); SDXL folders need it")
    if unet["in_channels"] != 4:
        raise CheckpointError(f"{where}: SDXL UNets with {unet['in_channels']} input channels (inpainting) "
                              "are not supported")
    node = _template("sdxl-base" if te is not None else "sdxl-refiner")
    embedders = node.params.conditioner_config.params.emb_models
    texts = [e for e in embedders if e.input_key == "txt"]
    micro = [e for e in embedders if e.input_key != "txt"]
    if te is not None:
        _apply_clip(texts[0], te)
        _put(texts[0].params, "layer_idx", int(te["num_hidden_layers"]) - 1)  # diffusers' hidden_states[-2]
    _apply_openclip(texts[-1], te2, extra_layers=0, embed_dim=te2.get("projection_dim"))
    outdim = int(unet["addition_time_embed_dim"])
    for emb in micro:
        _put(emb.params, "outdim", outdim)
    values = 2 * len(micro) - (te is None)  # (h, w) pairs; the refiner's aesthetic score is one number
    widths = [t["hidden_size"] for t in (te, te2) if t is not None]
    expected = {"projection_class_embeddings_input_dim": te2["projection_dim"] + values * outdim,
                "cross_attention_dim": sum(widths)}
    for key, value in expected.items():
        if unet[key] != value:
            raise CheckpointError(f"{where}/unet/config.json: {key}={unet[key]}, but the text encoders make {value}")
    _put(node.params.network_config.params, "adm_in_channels", int(unet["projection_class_embeddings_input_dim"]))
    denoiser = node.params.denoiser_config.params
    denoiser.scaling_config.target = "ldm.modules.diffusionmodules.denoiser_scaling." + (
        "VScaling" if prediction == "v" else "EpsScaling")
    sched = cfgs.scheduler
    _check_schedule(sched, where)
    disc = denoiser.discretization_config
    if "params" not in disc:
        disc.params = {}
    _put(disc.params, "linear_start", float(sched.get("beta_start", 0.00085)), default=0.00085)
    _put(disc.params, "linear_end", float(sched.get("beta_end", 0.012)), default=0.012)
    _put(disc.params, "num_timesteps", int(sched.get("num_train_timesteps", 1000)), default=1000)
    _put(denoiser, "num_idx", int(sched.get("num_train_timesteps", 1000)))
    if not disc.params:
        del disc["params"]
    return node


def _check_schedule(sched: Mapping[str, Any], where: str) -> None:
    if sched.get("beta_schedule", "linear") != "scaled_linear" or sched.get("trained_betas") is not None:
        raise CheckpointError(f"{where}/scheduler: beta_schedule {sched.get('beta_schedule')!r} is not supported; "
                              "SD's schedule is 'scaled_linear'")


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, tuple], where: str) -> None:
    for key, allowed in fixed.items():
        value = config.get(key, allowed[0])
        if isinstance(value, (list, tuple)) and key == "only_cross_attention":
            value = any(value)
        if value not in allowed:
            raise CheckpointError(f"{where}: {key}={value!r} is not supported here (only {allowed[0]!r})")


PER_LEVEL = ("transformer_depth", "context_dim")  # an int means the same value at every level


def _put(params: DictConfig, key: str, value: Any, default: Any = None) -> None:
    """Set ``params[key]`` unless it already means ``value`` (so full-size folders keep the bundled YAML as is)."""
    current = params.get(key, default)
    if _normal(current, key in PER_LEVEL) != _normal(value, key in PER_LEVEL):
        params[key] = value


def _normal(value: Any, collapse: bool = False) -> Any:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (list, tuple)):
        if collapse and len(set(map(str, value))) == 1:
            return _normal(value[0])
        return [_normal(v) for v in value]
    return round(value, 12) if isinstance(value, float) else value


def _apply_unet(params: DictConfig, unet: Mapping[str, Any], where: str) -> None:
    where = f"{where}/unet/config.json"
    channels = list(unet["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    levels = len(channels)
    attention = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
    mirrored = ["CrossAttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(levels))]
    if any(t not in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down) or up != mirrored or len(down) != levels:
        raise CheckpointError(f"{where}: block types {down} / {up} are not a CompVis UNet's (mirrored "
                              "DownBlock2D/CrossAttnDownBlock2D and their up blocks)")
    if not isinstance(unet["layers_per_block"], int):
        raise CheckpointError(f"{where}: per-level layers_per_block {unet['layers_per_block']} is not supported")
    heads = unet["num_attention_heads"] or unet["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    used = sorted(set(attention) | {levels - 1})  # levels with attention, and the middle block's
    if len({heads[i] for i in used}) == 1:
        head_setting = {"num_heads": int(heads[used[0]])}
    elif all(channels[i] % heads[i] == 0 for i in used) and len({channels[i] // heads[i] for i in used}) == 1:
        head_setting = {"num_head_channels": channels[used[0]] // heads[used[0]]}
    else:
        raise CheckpointError(f"{where}: attention heads {heads} fit neither a fixed head count nor a fixed head width")
    (key, value), = head_setting.items()
    if params.get(key, -1) != value or params.get("num_heads" if key != "num_heads" else "num_head_channels", -1) != -1:
        params.pop("num_heads", None)
        params.pop("num_head_channels", None)
        params[key] = value
    depth = unet["transformer_layers_per_block"]
    context = unet["cross_attention_dim"]
    for name, value in (("in_channels", unet["in_channels"]), ("out_channels", unet["out_channels"]),
                        ("model_channels", base), ("channel_mult", [c // base for c in channels]),
                        ("num_res_blocks", unet["layers_per_block"]),
                        ("transformer_depth", list(depth) if isinstance(depth, (list, tuple)) else depth),
                        ("context_dim", list(context) if isinstance(context, (list, tuple)) else context),
                        ("use_linear_in_transformer", bool(unet["use_linear_projection"])),
                        ("time_cond_proj_dim", unet["time_cond_proj_dim"])):
        _put(params, name, value, default=False if name == "use_linear_in_transformer" else None)
    if sorted(params.get("attention_resolutions", [])) != [2 ** i for i in attention]:
        params.attention_resolutions = [2 ** i for i in attention]


def _apply_vae(params: DictConfig, vae: Mapping[str, Any], where: str) -> None:
    _check_fixed(vae, _VAE_FIXED, where)
    channels = list(vae["block_out_channels"])
    if set(vae["down_block_types"]) != {"DownEncoderBlock2D"} or set(vae["up_block_types"]) != {"UpDecoderBlock2D"}:
        raise CheckpointError(f"{where}: block types other than DownEncoderBlock2D/UpDecoderBlock2D are not supported")
    if any(c % channels[0] for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    first = params.first_stage_config.params
    dd = first.ddconfig
    for name, value in (("ch", channels[0]), ("ch_mult", [c // channels[0] for c in channels]),
                        ("num_res_blocks", vae["layers_per_block"]), ("z_channels", vae["latent_channels"]),
                        ("in_channels", vae["in_channels"]), ("out_ch", vae["out_channels"])):
        _put(dd, name, value)
    _put(first, "embed_dim", vae["latent_channels"])
    _put(params, "scale_factor", float(vae["scaling_factor"]))


def _clip_fields(te: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps")
    return {k: te[k] for k in keys if k in te}


def _apply_clip(embedder: DictConfig, te: Mapping[str, Any]) -> None:
    from ldm.modules.encoders.modules import _CLIP_TEXT_BASE, KNOWN_CLIP_TEXT_CONFIGS

    params = embedder.get("params") or {}
    version = params.get("version", "openai/clip-vit-large-patch14")
    known = {**_CLIP_TEXT_BASE, **KNOWN_CLIP_TEXT_CONFIGS.get(version, {})}
    fields = _clip_fields(te)
    if any(_normal(known.get(k)) != _normal(v) for k, v in fields.items()):
        if embedder.get("params") is None:
            embedder.params = {}
        embedder.params.text_config = fields


def _apply_openclip(embedder: DictConfig, te: Mapping[str, Any], extra_layers: int, embed_dim: Optional[int]) -> None:
    import open_clip

    params = embedder.params
    arch = open_clip.get_model_config(params.get("arch", "ViT-H-14"))
    width = int(te["hidden_size"])
    text_cfg = {"context_length": int(te["max_position_embeddings"]), "vocab_size": int(te["vocab_size"]),
                "width": width, "heads": int(te["num_attention_heads"]),
                "layers": int(te["num_hidden_layers"]) + extra_layers}
    if int(te["intermediate_size"]) != 4 * width:
        text_cfg["mlp_ratio"] = int(te["intermediate_size"]) / width
    model_config: dict[str, Any] = {}
    if text_cfg != arch["text_cfg"] or (embed_dim is not None and extra_layers == 0 and embed_dim != arch["embed_dim"]):
        model_config = {"embed_dim": int(embed_dim or width), "text_cfg": text_cfg}
    if te.get("hidden_act", "gelu") == "quick_gelu":
        model_config["quick_gelu"] = True
    if float(te.get("layer_norm_eps", 1e-5)) != 1e-5:
        raise CheckpointError(f"text encoder layer_norm_eps={te['layer_norm_eps']} is not OpenCLIP's 1e-5")
    if model_config:
        params.model_config = model_config
