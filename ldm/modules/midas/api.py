"""``MiDaSInference``: SD 2's depth stage (``depth_stage_config: target: ldm.modules.midas.api.MiDaSInference``).

SD 2's own class reads ``midas_models/dpt_hybrid-midas-501f0c75.pt`` (relative to the working directory) when
it is built. This one never reads a file on its own and never downloads: it builds the network without weights,
and the weights come from

* the SD 2 depth checkpoint itself: the published ``512-depth-ema.ckpt`` holds them under ``depth_model.model.*``
  (a saved ``LatentDepth2ImageDiffusion`` carries its depth stage); the loader assigns them as the other weights;
* or ``midas_weights``, a MiDaS weights file (``dpt_hybrid-midas-501f0c75.pt`` from isl-org/MiDaS, or any file
  with its keys, bare or under ``depth_model.model.``), for a checkpoint without them; it wins over the
  checkpoint's. Read safely: safetensors, or ``torch.load(weights_only=True)``.

A model loaded from a checkpoint without either has no depth weights (:attr:`MiDaSInference.has_weights` is
False): it still runs with a depth map supplied by the user; estimating depth raises a one-line error naming
``midas_weights``.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.dpt import DPTDepthModel

MODEL_TYPES = ("dpt_hybrid",)
PREFIX = "depth_model."  # where LatentDepth2ImageDiffusion keeps its depth stage
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"
NO_WEIGHTS = (f"no MiDaS depth weights: the checkpoint has no depth_model.* keys and midas_weights is not set; "
              f"set midas_weights to the MiDaS file ({MIDAS_FILE}), or give a depth map")


class MiDaSInference(nn.Module):
    """Relative inverse depth of images: ``[B, 3, H, W]`` in [-1, 1] (H, W multiples of 32, as SD 2's MiDaS
    transform makes them) -> ``[B, 1, H, W]``.

    ``model_type``: only ``dpt_hybrid`` (what SD 2's depth model was trained with). ``midas_weights``: a
    MiDaS weights file, loaded at construction (see the module doc). ``dpt_config``: architecture overrides of
    :class:`~ldm.modules.midas.dpt.DPTDepthModel` (tiny test models); the key structure stays MiDaS'.
    """

    def __init__(self, model_type: str = "dpt_hybrid", midas_weights: Optional[str] = None,
                 dpt_config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"MiDaS model_type {model_type!r} is not supported; use {MODEL_TYPES[0]!r} (SD 2 depth)")
        options = dict(dpt_config or {})
        known = list(inspect.signature(DPTDepthModel).parameters)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"dpt_config has no option {', '.join(map(repr, unknown))}; options: {', '.join(known)}")
        self.model_type = model_type
        self.midas_weights = None if midas_weights is None else str(midas_weights)
        if self.midas_weights is not None:
            check_weights_file(self.midas_weights)
        self.model = DPTDepthModel(**options)
        self.model.eval()
        # Built on the meta device (the checkpoint loader's way), the weights come later: fill_depth_weights.
        # Built for real, the network has its random initialisation, or the midas_weights file's.
        self.has_weights = not any(p.is_meta for p in self.parameters())
        if self.midas_weights is not None and self.has_weights:
            self.model.load_state_dict(read_midas_weights(self.midas_weights), strict=True)

    def train(self, mode: bool = True) -> "MiDaSInference":
        return super().train(False)  # frozen, as SD 2 keeps it: always in eval mode

    @property
    def net_size(self) -> int:
        """The side the network was trained at (384 for dpt_hybrid): what :meth:`transform` resizes towards."""
        return self.model.pretrained.model.patch_size * math.isqrt(self.model.pretrained.model.pos_embed.shape[1] - 1)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """SD 2's MiDaS input (``AddMiDaS``) from images ``[B, 3, H, W]`` in [-1, 1]: bicubic resize keeping the
        aspect ratio to the size nearest ``net_size`` whose sides are multiples of 32. (SD 2 resizes with OpenCV's
        bicubic, which differs from torch's at the borders; its normalisation, mean = std = 0.5, maps the [0, 1]
        image back to [-1, 1].)"""
        size = midas_input_size(images.shape[-2], images.shape[-1], self.net_size)
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)

    def estimate(self, images: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth ``[B, 1, h, w]`` (MiDaS input size) of images ``[B, 3, H, W]`` in [-1, 1]."""
        return self(self.transform(images))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_weights:
            raise ValueError(NO_WEIGHTS)
        weights = next(self.model.parameters())
        depth = self.model(x.to(weights.device, weights.dtype)).unsqueeze(1)
        if depth.shape[-2:] != x.shape[-2:]:  # the network's output is already at the input's size
            depth = F.interpolate(depth, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return depth.float()


def midas_input_size(height: int, width: int, net_size: int = 384, multiple: int = 32) -> tuple[int, int]:
    """MiDaS' "minimal" resize: one scale for both sides, the one of the side that changes least to reach
    ``net_size``, each side then rounded to a multiple of ``multiple`` (at least one)."""
    scale_h, scale_w = net_size / height, net_size / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    h, w = (max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))
    return h, w


def check_weights_file(path: Union[str, os.PathLike]) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"midas_weights: file {str(path)!r} not found; give the MiDaS {MIDAS_FILE} "
                                "(isl-org/MiDaS v3 release), or leave midas_weights unset for a checkpoint that has them")


def read_midas_weights(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The DPT state dict of a MiDaS weights file (keys ``pretrained.*`` / ``scratch.*``), read safely; a
    training checkpoint's ``model`` entry and keys under ``depth_model.model.`` are accepted."""
    from ldm.checkpoint import read_state_dict

    check_weights_file(path)
    state = read_state_dict(path)
    if isinstance(state.get("model"), Mapping):
        state = dict(state["model"])
    inner = PREFIX + "model."
    if any(k.startswith(inner) for k in state):
        state = {k[len(inner):]: v for k, v in state.items() if k.startswith(inner)}
    if not any(k.startswith("pretrained.") for k in state):
        raise ValueError(f"midas_weights: {str(path)!r} holds no MiDaS DPT weights (no pretrained.* keys); "
                         f"give {MIDAS_FILE}")
    return state


def fill_depth_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint ``state`` of a model with a MiDaS depth stage, completed for loading: a ``midas_weights``
    file replaces the checkpoint's ``depth_model.*`` entries; without either the depth stage gets zeros and
    stays marked as weightless (a depth map must then be given). Other models: ``state`` as is."""
    depth = getattr(model, "depth_model", None)
    state = dict(state)
    if not isinstance(depth, MiDaSInference):
        return state
    if depth.midas_weights is not None:
        state = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        state.update({f"{PREFIX}model.{k}": v for k, v in read_midas_weights(depth.midas_weights).items()})
    elif not any(k.startswith(PREFIX) for k in state):
        state.update({PREFIX + k: torch.zeros(v.shape, dtype=v.dtype) for k, v in depth.state_dict().items()})
        return state
    depth.has_weights = True
    return state
