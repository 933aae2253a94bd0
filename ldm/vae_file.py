"""A standalone VAE file into a model's ``first_stage_model`` (e.g. sdxl-vae-fp16-fix, vae-ft-mse-840000).

    replace_vae(model, "sdxl_vae_fp16_fix.safetensors")

Accepted layouts: the autoencoder's own keys (``encoder.down.0...``), the same under
``first_stage_model.`` (a whole model file: only its VAE is taken), and diffusers' ``AutoencoderKL``
keys (``encoder.down_blocks.0...``), renamed here. Training-only keys (``loss.*``: discriminator,
LPIPS) are dropped. The match is strict: a VAE of another shape is refused, naming the keys.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

import torch

from ldm.checkpoint import CheckpointError, load_into_model, read_state_dict

_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",  # diffusers >= 0.14
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out", "group_norm": "norm"}
_RESNET = {"conv_shortcut": "nin_shortcut"}
_TOP = {"conv_norm_out": "norm_out"}


def is_diffusers_vae(keys) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)


def _rename_diffusers(key: str, n_up: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        kind, i, group, j, tail = m.groups()
        level = int(i) if kind == "down" else n_up - 1 - int(i)  # diffusers counts decoder levels from the bottom
        if group == "resnets":
            head, _, param = tail.partition(".")
            return f"{side}.{kind}.{level}.block.{j}.{_RESNET.get(head, head)}.{param}"
        sampler = "downsample" if kind == "down" else "upsample"
        return f"{side}.{kind}.{level}.{sampler}.{tail}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        head, _, param = m.group(2).partition(".")
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_RESNET.get(head, head)}.{param}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m and m.group(1) in _ATTN:
        return f"{side}.mid.attn_1.{_ATTN[m.group(1)]}.{m.group(2)}"
    head, _, param = rest.partition(".")
    return f"{side}.{_TOP.get(head, head)}.{param}"


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> CompVis ``AutoencoderKL`` keys (attention projections become 1x1 convs)."""
    levels = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(levels) + 1 if levels else 0
    out = {}
    for key, value in state.items():
        new = _rename_diffusers(key, n_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def vae_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The CompVis-layout autoencoder weights in ``path`` (any accepted layout), without training-only keys."""
    state = read_state_dict(path)
    if any(k.startswith("first_stage_model.") for k in state):
        state = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    elif is_diffusers_vae(state):
        state = from_diffusers(state)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if not any(k.startswith("decoder.") for k in state):
        raise CheckpointError(f"{path} has no autoencoder weights (no decoder.* keys); pass a VAE file such as "
                              "sdxl_vae.safetensors or diffusion_pytorch_model.safetensors of a diffusers vae folder")
    return state


def replace_vae(model: torch.nn.Module, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> None:
    """Load the VAE in ``path`` into ``model.first_stage_model`` (strict); the model is unchanged on failure."""
    first = model.first_stage_model
    state = vae_state_dict(path)
    try:
        load_into_model(first, state, strict=True, dtype=dtype, optional_keys=("loss.*",))
    except CheckpointError as err:
        raise CheckpointError(f"VAE file {path} does not fit the model's autoencoder: {err}") from None
