"""Few-step samplers for consistency-distilled models: LCM (and LCM-LoRA) and TCD.

Same form as :mod:`solvers` (``x`` in the VE form at ``sigmas[0]``, ``step(i, x, x0)`` reports progress,
``noise(x)`` draws fresh noise from the run's seeded source), plus ``schedule``: these models were distilled
on training timesteps, so their updates need the timestep of a level (``schedule.sigma_to_t``) and the
level of a timestep (``schedule.sigmas[t]``). The core passes its :class:`DiscreteDenoiser`.

A model latent ``z`` at level sigma is ``x / sqrt(1 + sigma^2)``; a clean latent is the same in both forms.
"""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch

from ldm.models.diffusion.sampling.solvers import Denoise, Noise, Step, _sig

SIGMA_DATA = 0.5  # the consistency-model boundary condition's data scale (Song et al. 2023; LCM keeps it)


class Schedule(Protocol):
    sigmas: torch.Tensor  # sigma of each training timestep, ascending

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor: ...


def _timestep(schedule: Schedule, sigma: torch.Tensor) -> float:
    """The (possibly fractional) training timestep of level ``sigma``; exact integers for table values."""
    return float(schedule.sigma_to_t(sigma.reshape(1).to(schedule.sigmas.device))[0])


def boundary_scalings(t, timestep_scaling: float = 10.0):
    """LCM's (c_skip, c_out) at training timestep ``t`` (a float, or a tensor of them): the consistency function
    is ``c_skip * z + c_out * x0``, which is ``z`` itself at t = 0 and tends to ``x0`` as t grows."""
    scaled = t * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def _require(noise: Optional[Noise]) -> Noise:
    if noise is None:
        raise ValueError("a stochastic sampler needs a noise source")
    return noise


@torch.no_grad()
def sample_lcm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None, *,
               schedule: Schedule, timestep_scaling: float = 10.0) -> torch.Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, diffusers' ``LCMScheduler``).

    At each level the consistency function maps the latent to a clean estimate; every step but one ending at
    sigma = 0 re-noises that estimate to the next level with fresh noise (a one-step run is deterministic).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        c_skip, c_out = boundary_scalings(_timestep(schedule, s), timestep_scaling)
        clean = c_skip * (x / (1 + s**2).sqrt()) + c_out * x0
        step(i, x, clean)
        x = clean if s_next == 0 else clean + _require(noise)(x) * s_next
    return x


@torch.no_grad()
def sample_tcd(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None, *,
               schedule: Schedule, eta: float = 0.3) -> torch.Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, diffusers'
    ``TCDScheduler``); ``eta`` is the paper's gamma.

    Each step goes deterministically (DDIM-like, along the predicted noise) from timestep t to
    ``s = floor((1 - eta) * t_next)``, then forward with fresh noise from s up to ``t_next``: eta = 0 is
    deterministic, eta = 1 goes down to t = 0 and re-noises from there (LCM-like). The last step ends at
    t = 0 (the "t0" final level), where diffusers returns that step's noised estimate.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"sampler 'tcd' takes eta (gamma, the stochastic share of each step) in [0, 1], got {eta}")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        step(i, x, x0)
        if s_next == 0:
            x = x0
            continue
        s_mid = schedule.sigmas[math.floor((1 - eta) * _timestep(schedule, s_next))].to(x.device, torch.float32)
        x = x0 + (s_mid / s) * (x - x0)
        if s_mid < s_next:
            x = x + _require(noise)(x) * (s_next**2 - s_mid**2).sqrt()
    return x
