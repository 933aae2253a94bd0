"""Checkpoint file <-> diffusers folder conversion (``scripts/ckpt_tool.py convert``).

    convert("v1-5-pruned-emaonly.safetensors", "sd15-diffusers")       # CompVis file -> diffusers folder
    convert("sd15-diffusers", "sd15.safetensors")                      # diffusers folder -> CompVis file

Tensors are carried over as they are (same dtype, same values) unless ``dtype`` is given, so file -> folder ->
file gives back the same tensors under the same keys (``model_ema.*`` aside: pick them with ``use_ema``).
The config of the file side is inferred where the weights decide it (SD 1.x, inpainting models, SDXL base /
refiner); SD 2.x files may be eps or v models and need ``config``. Both outputs appear whole or not at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn

from ldm.api import OPTIONAL_KEYS, _has_ema_option, build_model, guess_architecture, load_config
from ldm.checkpoint import (
    GUIDANCE_INPUT_KEY, CheckpointError, check_state_dict, read_state_dict, save_state_dict, split_ema,
)
from ldm.diffusers_folder import folder_state_dict, write_folder

PathLike = Union[str, os.PathLike]
INFERRED = {"SD 1.x": "v1-inference", "SD 1.x inpainting": "v1-inpainting-inference",
            "SD 2.x inpainting": "v2-inpainting-inference"}


def convert(source: PathLike, target: PathLike, *, config: Optional[PathLike] = None, use_ema: bool = False,
            dtype: Optional[torch.dtype] = None, allow_unsafe_pickle: bool = False) -> str:
    """Convert ``source`` (a checkpoint file or a diffusers folder) into the other format at ``target``;
    returns a one-line summary."""
    if Path(source).is_dir():
        node = load_config(config if config is not None else source)
        model = empty_model(node)
        state = folder_state_dict(source, model, node)
        check_state_dict(model, state, optional_keys=OPTIONAL_KEYS)
        save_state_dict(state, target, dtype=dtype, metadata={"converted_from": Path(source).name})
        return f"wrote {target} ({len(state)} tensors, CompVis keys)"
    state = read_state_dict(source, allow_unsafe_pickle=allow_unsafe_pickle)
    config = config if config is not None else infer_config(state, source)
    node = load_config(config)
    model = empty_model(node)
    state = split_ema(state, [f"model.{n}" for n, _ in model.model.named_parameters()], use_ema)
    try:
        check_state_dict(model, state, optional_keys=OPTIONAL_KEYS)
    except CheckpointError as err:
        counts = str(err).splitlines()[0].split("; use the matching")[0]  # "... does not match X (N missing, ...)"
        raise CheckpointError(f"{source} does not fit config {config}: {counts}; pass the matching --config") from None
    out = write_folder(state, model, node, target, dtype=dtype)
    components = sorted(p.name for p in out.iterdir() if p.is_dir())
    return f"wrote {out} (diffusers folder: {', '.join(components)})"


def infer_config(state: Mapping[str, torch.Tensor], source: PathLike) -> str:
    """The bundled config of a full-size CompVis file, where its weights decide it."""
    looks = guess_architecture({k: tuple(v.shape) for k, v in state.items()})
    name = INFERRED.get(looks)
    if looks == "SD 1.x" and GUIDANCE_INPUT_KEY in state:
        name = "v1-lcm-inference"
    if looks == "SDXL":
        name = "sdxl-refiner" if any(k.startswith("conditioner.embedders.0.model.") for k in state) else "sdxl-base"
    if name is None:
        hint = " (eps: v2-inference.yaml, v: v2-inference-v.yaml)" if looks == "SD 2.x" else ""
        raise CheckpointError(f"cannot tell the config of {source} (looks like {looks}); pass --config{hint}")
    return f"configs/stable-diffusion/{name}.yaml"


def empty_model(node: DictConfig) -> nn.Module:
    """The config's model for inference (no EMA copy), parameters on the meta device."""
    return build_model(node, empty=True, **({"use_ema": False} if _has_ema_option(node) else {}))
