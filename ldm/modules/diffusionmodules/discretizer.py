"""Noise-level tables of discrete-time models, under the names Stability's ``sgm`` configs use.

``LegacyDDPMDiscretization`` is the SD 1.x / 2.x / SDXL training schedule: betas linear in
``sqrt(beta)`` from ``linear_start`` to ``linear_end`` over ``num_timesteps`` steps.
"""
from __future__ import annotations

import torch

from ldm.models.diffusion import schedule as sched


class LegacyDDPMDiscretization:
    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000) -> None:
        tables = sched.schedule_tables("linear", num_timesteps, linear_start, linear_end)
        self.num_timesteps = num_timesteps
        self.alphas_cumprod = torch.tensor(tables["alphas_cumprod"], dtype=torch.float64)

    def sigmas(self) -> torch.Tensor:
        """sqrt((1 - alpha_bar) / alpha_bar) per training timestep, ascending (index = timestep)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
