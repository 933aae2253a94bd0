"""``DiscreteDenoiser`` as ``sgm`` configs declare it: parameterization + discrete noise levels.

It holds the ``denoiser.sigmas`` table SDXL files carry (optional when loading: it is recomputed),
and tells the model its ``alphas_cumprod`` and parameterization. Sampling itself runs through the
shared core (``ldm.models.diffusion.sampling``), like every other model here.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.util import instantiate_from_config


class DiscreteDenoiser(nn.Module):
    def __init__(self, scaling_config: Mapping[str, Any], num_idx: int, discretization_config: Mapping[str, Any],
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True,
                 weighting_config: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)
        self.discretization = instantiate_from_config(discretization_config)
        self.weighting = instantiate_from_config(weighting_config) if weighting_config else None
        if num_idx != self.discretization.num_timesteps:
            raise ValueError(f"DiscreteDenoiser: num_idx={num_idx} but the discretization has "
                             f"{self.discretization.num_timesteps} timesteps; make them equal")
        if do_append_zero or not flip or not quantize_c_noise:
            raise ValueError("DiscreteDenoiser: only the published settings are supported "
                             "(do_append_zero: false, flip: true, quantize_c_noise: true)")
        self.register_buffer("sigmas", self.discretization.sigmas().float())

    @property
    def parameterization(self) -> str:
        return self.scaling.parameterization

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.discretization.alphas_cumprod.float()
