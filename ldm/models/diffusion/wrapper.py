"""``DiffusionWrapper``: how a ``LatentDiffusion``'s conditioning reaches its UNet (CompVis name and keys:
the UNet is ``model.diffusion_model``). Also importable from ``ldm.models.diffusion.ddpm``, as in CompVis."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


class DiffusionWrapper(nn.Module):
    """Routes conditioning to the UNet: concatenated channels, cross-attention context, vector ``y``."""

    def __init__(self, diff_model_config: dict, conditioning_key: Optional[str]):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r} unknown; use one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat: Optional[list] = None, c_crossattn: Optional[list] = None, c_adm=None,
                timestep_cond: Optional[torch.Tensor] = None):
        """``timestep_cond``: the guidance embedding of a guidance-distilled UNet (``time_cond_proj_dim``)."""
        key = self.conditioning_key
        extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}
        if key in ("concat", "hybrid", "hybrid-adm"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(c_crossattn, 1) if key in ("crossattn", "hybrid", "hybrid-adm", "crossattn-adm") else None
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0], **extra)
        y = c_adm if key in ("hybrid-adm", "crossattn-adm") else None
        return self.diffusion_model(x, t, context=context, y=y, **extra)
