"""Load a ready model from (config, checkpoint) in one call, and save one back.

    model = load_model("configs/stable-diffusion/v1-inference.yaml", "v1-5-pruned-emaonly.safetensors")

The model is built with parameters on the meta device (no memory, no init time) and the
checkpoint's tensors are assigned in place, so peak memory stays near one copy of the weights.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError, empty_init, load_into_model, read_state_dict, save_state_dict, split_ema
from ldm.paths import bundled
from ldm.util import ConfigError, check_config_targets, get_obj_from_str, instantiate_from_config, load_yaml

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], DictConfig]

# Keys official files may carry that current libraries do not register (see shared/reference).
# position_ids: absent from some transformers versions' files; loss.*: an autoencoder's training-only
# discriminator/LPIPS weights (CompVis first-stage checkpoints have them, sampling never needs them).
# low_scale_model.*: the SD 2 x4 upscaler's noise-augmentation schedule, persistent buffers its file carries; computed
# from the config when a converted file drops them.
OPTIONAL_KEYS = ("*.embeddings.position_ids", "denoiser.sigmas", "loss.*", "low_scale_model.*")


def load_config(config: ConfigLike) -> DictConfig:
    """The ``model`` node of a config file or mapping (a bare ``target``/``params`` node is accepted)."""
    if isinstance(config, (str, os.PathLike)):
        path = bundled(config)  # "configs/..." also names a bundled config, from any folder
        if path.is_dir():  # a diffusers folder: the config follows from its model_index.json and component configs
            from ldm.diffusers_folder import folder_config

            return folder_config(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass the model YAML, e.g. configs/stable-diffusion/v1-inference.yaml")
        cfg = load_yaml(path)
        if not isinstance(cfg, DictConfig):
            raise ConfigError(f"config file {str(path)!r} holds a {type(cfg).__name__}, not a mapping; "
                              "use a CompVis-style model YAML (model: target: ... params: ...)")
    else:
        cfg = OmegaConf.create(dict(config) if not isinstance(config, DictConfig) else config)
    node = cfg.get("model", cfg)
    if not isinstance(node, DictConfig) or "target" not in node:
        raise ConfigError("config has neither a 'model' section nor a 'target' key; use a CompVis-style model YAML")
    check_config_targets(node)  # refused targets and misspelled params fail here, before anything is built
    return node


def build_model(config: ConfigLike, *, empty: bool = False, **param_overrides: Any) -> torch.nn.Module:
    """Instantiate the model of a config; ``empty=True`` puts parameters on the meta device."""
    node = load_config(config).copy()
    for key, value in param_overrides.items():
        node.params[key] = value
    if empty:
        with empty_init():
            return instantiate_from_config(node)
    return instantiate_from_config(node)


def load_model(
    config: Optional[ConfigLike],
    ckpt: Optional[Union[str, os.PathLike]] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    use_ema: bool = False,
    strict: bool = True,
    allow_unsafe_pickle: bool = False,
    share_from: Optional[torch.nn.Module] = None,
) -> torch.nn.Module:
    """Build the config's model and load ``ckpt`` into it (strict key match), ready for inference.

    ``use_ema`` picks the EMA weights (``model_ema.*``) of a file that has them; the default uses the
    raw ``model.*`` weights, as the CompVis scripts do. ``dtype`` converts floating weights.
    Without ``ckpt`` the model keeps its random initialisation.

    ``share_from``: an already loaded model whose autoencoder / conditioner embedders this one reuses
    (the same module objects, not a copy) where the file holds exactly the same weights: the SDXL
    refiner's OpenCLIP bigG text encoder and VAE are the base's.

    ``ckpt`` may be a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ...; also accepted as ``config``
    alone): ``config=None`` derives the config from it (:mod:`ldm.diffusers_folder`).
    """
    from ldm.diffusers_folder import folder_state_dict, is_diffusers_folder

    folder = ckpt if is_diffusers_folder(ckpt) else None
    if ckpt is None and is_diffusers_folder(config):
        folder = ckpt = config
    if config is None:
        if folder is None:
            raise ConfigError("load_model needs a config unless ckpt is a diffusers folder")
        config = folder
    # Inference builds never carry an EMA copy; EMA weights are chosen from the file instead.
    node = load_config(config).copy()
    overrides: dict[str, Any] = {"use_ema": False} if _has_ema_option(node) else {}
    node.params.pop("ckpt_path", None)
    if ckpt is not None:  # the file holds the first stage too: its own checkpoint (CompVis LDM configs) is not read
        first_stage = node.params.get("first_stage_config")
        if isinstance(first_stage, DictConfig) and isinstance(first_stage.get("params"), DictConfig):
            first_stage.params.pop("ckpt_path", None)
    if ckpt is None:
        model = build_model(node, **overrides)
        if dtype is not None:
            model = model.to(dtype)
    else:
        state = read_state_dict(ckpt, allow_unsafe_pickle=allow_unsafe_pickle) if folder is None else None
        model = build_model(node, empty=True, **overrides)
        if state is None:
            state = folder_state_dict(folder, model, node)
        names = [f"model.{n}" for n, _ in model.model.named_parameters()] if hasattr(model, "model") else []
        state = split_ema(state, names, use_ema)
        if hasattr(model, "depth_model"):  # SD 2 depth: MiDaS weights from midas_weights, else the file's (or none)
            from ldm.modules.midas.api import fill_depth_weights

            state = fill_depth_weights(model, state)
        shared = share_parts(model, share_from, state) if share_from is not None else []
        try:
            load_into_model(model, state, strict=strict, dtype=dtype, optional_keys=OPTIONAL_KEYS,
                            ignore_keys=[f"{prefix}*" for prefix in shared])
        except CheckpointError as err:
            looks = guess_architecture({k: tuple(v.shape) for k, v in state.items()})
            raise CheckpointError(f"{ckpt} (looks like {looks}) does not fit config {_describe(config)}: {err}") from None
    return model.to(device).eval()


def _shareable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Key prefix -> part, for the parts a model may share: the autoencoder and each conditioner embedder."""
    parts = {"first_stage_model.": model.first_stage_model} if hasattr(model, "first_stage_model") else {}
    conditioner = dict(model.named_children()).get("conditioner")
    for i, embedder in enumerate(getattr(conditioner, "embedders", [])):
        parts[f"conditioner.embedders.{i}."] = embedder
    return parts


def share_parts(model: torch.nn.Module, other: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Put ``other``'s parts into ``model`` (empty, being loaded from ``state``) wherever ``state`` holds for that
    part exactly ``other``'s weights; returns the key prefixes now shared (their entries in ``state`` are unused)."""
    shared = []
    candidates = list(_shareable(other).values())
    for prefix, part in _shareable(model).items():
        own = part.state_dict(keep_vars=True)
        if not own or any(prefix + k not in state for k in own):
            continue
        for donor in candidates:
            theirs = donor.state_dict()
            if type(donor) is not type(part) or theirs.keys() != own.keys() or _settings(donor) != _settings(part):
                continue
            if all(state[prefix + k].shape == v.shape and torch.equal(state[prefix + k].to(v.dtype), v.cpu())
                   for k, v in theirs.items()):
                _replace_part(model, prefix, donor)
                candidates.remove(donor)
                shared.append(prefix)
                break
    return shared


def _settings(module: torch.nn.Module) -> dict[str, Any]:
    """A module's plain attributes (input keys, layer choice, ucg rate, ...): shared parts must agree on them too."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and not isinstance(v, (torch.nn.Module, torch.Tensor)) and not callable(v)
            and k != "training"}


def _replace_part(model: torch.nn.Module, prefix: str, module: torch.nn.Module) -> None:
    parent_name, _, name = prefix.rstrip(".").rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def save_model(model: torch.nn.Module, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
               include_ema: bool = True, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write the model's state dict (CompVis keys) atomically; ``.safetensors`` unless the name ends in ``.ckpt``."""
    state = model.state_dict()
    if not include_ema:
        state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    save_state_dict(state, path, metadata=dict(metadata or {}), dtype=dtype)


def guess_architecture(shapes: Mapping[str, tuple]) -> str:
    """A human label for a CompVis-layout state dict, from its key names and first conv."""
    first = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    kinds = {9: " inpainting", 7: " x4 upscaler", 5: " depth"}
    inpaint = kinds.get(first[1], "") if first is not None and len(first) > 1 else ""
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "SD 1.x" + inpaint
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "SD 2.x" + inpaint
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "SDXL"
    if any(k.startswith("encoder.down.") for k in shapes):
        return "a standalone autoencoder"
    return "an unknown architecture"


def _has_ema_option(node: DictConfig) -> bool:
    """Whether the config's class takes ``use_ema`` (DDPM family, DiffusionEngine): inference builds turn it off."""
    import inspect

    cls = get_obj_from_str(node.target)
    try:
        return "use_ema" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _describe(config: ConfigLike) -> str:
    return repr(str(config)) if isinstance(config, (str, os.PathLike)) else load_config(config).target
