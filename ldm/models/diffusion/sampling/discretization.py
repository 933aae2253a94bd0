"""Which noise levels a sampler visits: timestep spacings and sigma schedules, as data.

Every function returns a descending sigma tensor of length ``num_steps + 1``; the last entry is
the level the sampler ends at (0, or sigma(t=0) for the CompVis DDIM/PLMS convention).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ldm.models.diffusion.sampling.denoiser import DiscreteDenoiser


def compvis_timesteps(kind: str, num_steps: int, num_train: int = 1000) -> np.ndarray:
    """CompVis ``make_ddim_timesteps``: ascending, +1 so the last step lands on alpha_bar[0]; exactly ``num_steps``.

    "uniform" takes every ``num_train // num_steps``-th step. Upstream kept all of them, one or more steps
    too many when ``num_steps`` does not divide ``num_train`` (30 -> 31, 3 -> 4, the last past the schedule);
    here the first ``num_steps`` (diffusers' "leading" spacing), as :func:`make_ddim_timesteps` does.
    """
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {num_steps}")
    if kind == "uniform":
        ts = np.arange(0, num_train, num_train // num_steps)
    elif kind == "quad":
        ts = (np.linspace(0, np.sqrt(num_train * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown CompVis discretization {kind!r}; use uniform or quad")
    ts = ts[:num_steps] + 1
    return ts - 1 if ts[-1] >= num_train else ts  # num_steps == num_train: every trained step


def spaced_timesteps(kind: str, num_steps: int, num_train: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """diffusers' spacings, ascending: leading (with offset), trailing, linspace (k-diffusion's)."""
    if kind == "leading":
        return np.arange(0, num_steps) * (num_train // num_steps) + steps_offset
    if kind == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64)[::-1] - 1
    if kind == "linspace":
        return np.linspace(0, num_train - 1, num_steps)
    raise ValueError(f"unknown spacing {kind!r}")


def lcm_timesteps(num_steps: int, num_train: int = 1000, original_steps: int = 50) -> np.ndarray:
    """Latent consistency models' spacing (diffusers' ``LCMScheduler`` / ``TCDScheduler``), ascending.

    The model was distilled on a skipping-step grid of ``original_steps`` timesteps, ``k - 1, 2k - 1, ...,
    num_train - 1`` with ``k = num_train // original_steps``; a run visits ``num_steps`` of them, evenly
    spaced by index from the top of the grid.
    """
    if not 1 <= original_steps <= num_train:
        raise ValueError(f"original_steps must be in [1, {num_train}], got {original_steps}")
    if not 1 <= num_steps <= original_steps:
        raise ValueError(f"the lcm schedule takes 1 to {original_steps} steps (its distillation grid), got {num_steps}; "
                         "use fewer steps (LCM: 2 to 8)")
    k = num_train // original_steps
    grid = np.arange(original_steps, 0, -1) * k - 1  # descending
    picks = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return grid[picks][::-1].copy()


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule: uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).float()


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp().float()


DISCRETIZATIONS = ("uniform", "quad", "leading", "trailing", "linspace", "karras", "exponential", "lcm")


def get_sigmas(denoiser: DiscreteDenoiser, kind: str, num_steps: int, final: str = "zero") -> torch.Tensor:
    """Descending sigmas for ``num_steps`` steps, plus the final level (``"zero"`` or ``"t0"`` = sigma(0))."""
    if kind not in DISCRETIZATIONS:
        raise ValueError(f"unknown discretization {kind!r}; use one of {', '.join(DISCRETIZATIONS)}")
    n = denoiser.num_timesteps
    if kind in ("karras", "exponential"):
        lo, hi = float(denoiser.sigma_min), float(denoiser.sigma_max)
        sig = karras_sigmas(num_steps, lo, hi) if kind == "karras" else exponential_sigmas(num_steps, lo, hi)
    elif kind == "lcm":
        return sigmas_from_timesteps(denoiser, lcm_timesteps(num_steps, n), final)
    else:
        ts = compvis_timesteps(kind, num_steps, n) if kind in ("uniform", "quad") else spaced_timesteps(kind, num_steps, n)
        return sigmas_from_timesteps(denoiser, ts, final)
    return torch.cat([sig.float(), _final(denoiser, final)])


def _final(denoiser: DiscreteDenoiser, final: str) -> torch.Tensor:
    if final not in ("zero", "t0"):
        raise ValueError(f"final must be 'zero' or 't0', got {final!r}")
    return torch.zeros(1) if final == "zero" else denoiser.sigmas[:1].cpu().float()


def sigmas_from_timesteps(denoiser: DiscreteDenoiser, timesteps, final: str = "zero") -> torch.Tensor:
    """Descending sigmas for ascending (possibly fractional) ``timesteps``, plus the final level."""
    n = denoiser.num_timesteps
    ts = torch.from_numpy(np.clip(np.asarray(timesteps, dtype=np.float64), 0, n - 1)[::-1].copy())
    if torch.equal(ts, ts.round()):  # table values exactly, no interpolation round-off
        sig = denoiser.sigmas.cpu()[ts.long()]
    else:
        sig = denoiser.t_to_sigma(ts.float()).cpu()
    return torch.cat([sig.float(), _final(denoiser, final)])
