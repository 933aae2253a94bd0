"""Samplers as small functions over one denoiser ``D(x, sigma) -> x0`` in the VE form.

Each takes ``(denoise, x, sigmas, step)`` where ``x`` is already at ``sigmas[0]`` and
``step(i, x, x0)`` reports progress; stochastic ones draw fresh noise from ``noise(x)``.
DDIM (eta=0) is the Euler step of the probability-flow ODE in this form; DDIM with eta and
DDPM ancestral sampling are the ancestral step below (identical formulas, checked in tests).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[int, torch.Tensor, torch.Tensor], None]


def _sig(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.device).expand(x.shape[0])


def ancestral_split(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): a deterministic move to sigma_down plus fresh noise of std sigma_up."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
    return (sigma_next**2 - up**2).sqrt(), up


@torch.no_grad()
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, _sig(sigmas[i], x))
        step(i, x, x0)
        x = x0 + (sigmas[i + 1] / sigmas[i]) * (x - x0)
    return x


@torch.no_grad()
def sample_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None,
                     eta: float = 1.0) -> torch.Tensor:
    """DDIM with ``eta`` (CompVis), Euler ancestral (eta=1 on any schedule), DDPM (eta=1 on the trained steps)."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, _sig(sigmas[i], x))
        step(i, x, x0)
        down, up = ancestral_split(sigmas[i], sigmas[i + 1], eta)
        x = x0 + (down / sigmas[i]) * (x - x0)
        if up > 0:
            if noise is None:
                raise ValueError("a stochastic sampler needs a noise source")
            x = x + noise(x) * up
    return x


@torch.no_grad()
def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        step(i, x, x0)
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, _sig(s_next, x))) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
    return x


@torch.no_grad()
def sample_plms(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None) -> torch.Tensor:
    """CompVis PLMS: Adams-Bashforth on eps, with a Heun-like first step."""
    old_eps: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        step(i, x, x0)
        eps = (x - x0) / s
        if not old_eps:
            # CompVis evaluates the second point at the next timestep of the schedule.
            s_eval = sigmas[min(i + 1, len(sigmas) - 2)]
            x_pred = x + eps * (s_eval - s)
            eps_next = (x_pred - denoise(x_pred, _sig(s_eval, x))) / s_eval
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * (s_next - s)
        old_eps = (old_eps + [eps])[-3:]
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None,
                        eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (midpoint form): the 2M update with eta-scaled injected noise."""
    old_x0, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        step(i, x, x0)
        if s_next == 0:
            x = x0
            continue
        h = s.log() - s_next.log()
        eta_h = eta * h
        x = (s_next / s) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * x0
        if old_x0 is not None:
            r = h_last / h
            x = x - 0.5 * torch.expm1(-h - eta_h) * (1 / r) * (x0 - old_x0)
        if eta > 0:
            if noise is None:
                raise ValueError("a stochastic sampler needs a noise source")
            x = x + noise(x) * s_next * (-torch.expm1(-2 * eta_h)).sqrt()
        old_x0, h_last = x0, h
    return x


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step, noise: Optional[Noise] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): the SDE form above without noise, i.e. multistep in log-sigma
    with first-order first and last steps."""
    return sample_dpmpp_2m_sde(denoise, x, sigmas, step, noise, eta=0.0)


@torch.no_grad()
def sample_dpmpp_multistep(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step,
                           noise: Optional[Noise] = None, order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++ multistep of ``order`` 1-3 (Lu et al. 2022), data prediction, in lambda = -log sigma.

    The order grows with the history (first step first order, second step at most second). As in the
    reference implementation and diffusers' ``DPMSolverMultistepScheduler``, ``lower_order_final`` lowers
    the order near the end of short runs (fewer than 15 steps: the last step first order, the one before
    at most second), which keeps few-step sampling stable; a step to sigma = 0 returns the prediction.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}")
    n = len(sigmas) - 1
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x0 prediction, lambda) of earlier steps, newest last
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _sig(s, x))
        step(i, x, x0)
        if s_next == 0:
            x = x0
            continue
        if s_next == s:  # a repeated level (e.g. a schedule ending at sigma_min, then "t0" = sigma_min): no move
            continue
        lam, h = -s.log(), s.log() - s_next.log()
        use = min(order, len(history) + 1)
        if lower_order_final and n < 15:
            use = min(use, n - i)  # last step: 1, the one before: at most 2
        phi = torch.expm1(-h)  # e^-h - 1
        x_next = (s_next / s) * x - phi * x0
        if use >= 2:
            m1, lam1 = history[-1]
            r0 = (lam - lam1) / h
            d1_0 = (x0 - m1) / r0
            if use == 2:
                x_next = x_next - 0.5 * phi * d1_0
            else:
                m2, lam2 = history[-2]
                r1 = (lam1 - lam2) / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next + (phi / h + 1) * d1 - ((phi + h) / h**2 - 0.5) * d2
        history = (history + [(x0, lam)])[-2:]
        x = x_next
    return x


def sample_dpmpp_3m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, step: Step,
                    noise: Optional[Noise] = None) -> torch.Tensor:
    """DPM-Solver++(3M): third-order multistep (see :func:`sample_dpmpp_multistep`)."""
    return sample_dpmpp_multistep(denoise, x, sigmas, step, noise, order=3)
