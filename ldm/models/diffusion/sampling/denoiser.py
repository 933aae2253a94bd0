"""One denoiser interface over a discrete-time model: ``D(x, sigma, cond) -> x0``.

Samplers work in the variance-exploding form ``x = x0 + sigma * eps`` (k-diffusion's), with
``sigma = sqrt((1 - alpha_bar) / alpha_bar)``. A latent ``z_t`` of the model's own
(variance-preserving) process is ``x / sqrt(1 + sigma^2)``. eps-, v- and x0-predicting models
are converted with the same functions the training loss uses (``schedule.to_x0_eps``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.models.diffusion.schedule import to_x0_eps


class DiscreteDenoiser(nn.Module):
    """Wraps a ``LatentDiffusion``/``DDPM`` (anything with ``apply_model`` and ``alphas_cumprod``)."""

    def __init__(self, model: nn.Module, parameterization: str | None = None):
        super().__init__()
        self.inner = model
        self.parameterization = parameterization or getattr(model, "parameterization", "eps")
        ac = model.alphas_cumprod.detach().to("cpu", torch.float64)
        sigmas = ((1 - ac) / ac).sqrt()
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at (possibly fractional) timesteps, interpolating log-sigma."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.log_sigmas.device)
        lo = t.floor().long().clamp(0, self.num_timesteps - 1)
        hi = (lo + 1).clamp(max=self.num_timesteps - 1)
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep of a sigma: exact integers for table values, log-linear interpolation otherwise."""
        log_sigma = sigma.to(self.log_sigmas).log()
        dists = log_sigma[:, None] - self.log_sigmas[None]
        nearest = dists.abs().argmin(dim=1)
        lo = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=self.num_timesteps - 2)
        hi = lo + 1
        w = ((self.log_sigmas[lo] - log_sigma) / (self.log_sigmas[lo] - self.log_sigmas[hi])).clamp(0, 1)
        t = (1 - w) * lo + w * hi
        exact = dists.gather(1, nearest[:, None]).squeeze(1).abs() < 1e-5
        return torch.where(exact, nearest.to(t.dtype), t)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Predicted clean latent x0 for the VE-form input ``x`` at noise level ``sigma`` [B]."""
        sigma = sigma.to(x.device, torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        alpha_bar = 1.0 / (1.0 + sigma.to(torch.float64) ** 2)
        c_in = alpha_bar.sqrt().to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        z_t = x * c_in
        t = self.sigma_to_t(sigma.to(self.log_sigmas.device)).to(x.device)
        out = self.inner.apply_model(z_t, t, cond)
        x0, _ = to_x0_eps(out.to(torch.float32), z_t.to(torch.float32), alpha_bar.to(torch.float32), self.parameterization)
        return x0.to(x.dtype)
