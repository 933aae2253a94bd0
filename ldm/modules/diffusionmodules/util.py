"""Small building blocks shared by the UNet and the diffusion process.

Beta schedules are computed with NumPy in float64 so that models build under
``with torch.device("meta")`` and the values match CompVis bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Betas as float64 NumPy. ``linear`` is linear in sqrt(beta) (diffusers' "scaled_linear")."""
    if schedule == "linear":
        betas = np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use one of linear, cosine, sqrt_linear, sqrt")
    return betas


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps, cos half first."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (statistics in half precision drift)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (CompVis init for output convolutions)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpoint(func, inputs: tuple, params, flag: bool):
    """Activation checkpointing when ``flag`` and gradients are needed (CompVis signature)."""
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple) -> torch.Tensor:
    """Gather ``a[t]`` and reshape to broadcast over a batch of shape ``x_shape``."""
    out = a.gather(-1, t.to(a.device))
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape, device, repeat: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    if repeat:
        return torch.randn((1, *shape[1:]), device=device, generator=generator).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device, generator=generator)
