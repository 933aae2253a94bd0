"""The discrete diffusion schedule and the eps / v / x0 parameterizations.

One place for the forward-process math: training (``DDPM.p_losses``) and every sampler
use these functions, so a loss and a sampler can never disagree about what the network
predicts. Tables are computed in float64 NumPy (build-safe on the meta device).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule

PARAMETERIZATIONS = ("eps", "x0", "v")

# The 12 tables CompVis registers as persistent buffers, in its order.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_tables(
    beta_schedule: str = "linear",
    timesteps: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
    given_betas: Optional[np.ndarray] = None,
    v_posterior: float = 0.0,
) -> dict[str, np.ndarray]:
    """All forward/posterior tables of a discrete schedule, float64."""
    betas = np.asarray(given_betas, dtype=np.float64) if given_betas is not None else make_beta_schedule(
        beta_schedule, timesteps, linear_start, linear_end, cosine_s)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        # The first posterior variance is 0; clip before the log.
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def vlb_weights(tables: dict[str, np.ndarray], parameterization: str) -> np.ndarray:
    """Per-timestep weights that turn the simple loss into the variational bound term."""
    betas, ac = tables["betas"], tables["alphas_cumprod"]
    if parameterization == "eps":
        with np.errstate(divide="ignore"):  # t=0 has zero posterior variance; replaced below
            w = betas**2 / (2 * tables["posterior_variance"] * (1 - betas) * (1 - ac))
    elif parameterization == "x0":
        w = 0.5 * np.sqrt(ac) / (2.0 * (1 - ac))
    elif parameterization == "v":
        w = np.ones_like(betas)
    else:
        raise ValueError(f"parameterization {parameterization!r} unknown; use one of {PARAMETERIZATIONS}")
    w = w.copy()
    w[0] = w[1]  # the t=0 weight is infinite for eps; reuse t=1's
    return w


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _bcast(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, device=x.device)
    return a.to(x.dtype).reshape(-1, *((1,) * (x.dim() - 1))) if a.dim() else a.to(x.dtype)


def q_sample(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, with ``alpha_bar`` per batch item."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_from(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho)."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def to_x0_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a network ``output`` of the given parameterization at x_t."""
    a = _bcast(alpha_bar, x_t)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if parameterization == "eps":
        return (x_t - s1a * output) / sa, output
    if parameterization == "v":
        return sa * x_t - s1a * output, sa * output + s1a * x_t
    if parameterization == "x0":
        return output, (x_t - sa * output) / s1a
    raise ValueError(f"parameterization {parameterization!r} unknown; use one of {PARAMETERIZATIONS}")


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, parameterization: str) -> torch.Tensor:
    """What the network should output for x_t = q_sample(x0, alpha_bar, noise)."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from(x0, noise, alpha_bar)
    raise ValueError(f"parameterization {parameterization!r} unknown; use one of {PARAMETERIZATIONS}")
