"""Low-resolution conditioning of SD 2's x4 upscaler (Stability-AI/stablediffusion names and signatures).

The upscaler's UNet sees the low-resolution image itself, concatenated to its latent (the latent of
an x4 upscaler has the low-res image's size). During training, and with a chosen level at sampling
time, that image is first noised with its own DDPM schedule (``q_sample`` at ``noise_level``) and the
level is passed to the UNet as its class label, so the model learns to trust a degraded input less.

``AbstractLowScaleModel`` holds the schedule: 8 persistent float32 buffers, as in the official
checkpoint (``low_scale_model.betas`` ... ``low_scale_model.sqrt_recipm1_alphas_cumprod``). The tables
are computed in float64 NumPy, so the modules also build on the meta device.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule

# The buffers upstream registers, in its order.
LOW_SCALE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
)


class AbstractLowScaleModel(nn.Module):
    """A low-res image -> (the image to concatenate, its noise level); the base keeps the image as it is."""

    def __init__(self, noise_schedule_config: Optional[dict] = None):
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule: str = "linear", timesteps: int = 1000, linear_start: float = 1e-4,
                          linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                   cosine_s=cosine_s)
        ac = np.cumprod(1.0 - betas)
        tables = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": np.append(1.0, ac[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        }
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        for name in LOW_SCALE_BUFFERS:
            self.register_buffer(name, torch.tensor(tables[name], dtype=torch.float32))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sqrt(alpha_bar[t]) * x_start + sqrt(1 - alpha_bar[t]) * noise`` (fresh Gaussian noise if none given)."""
        if not hasattr(self, "sqrt_alphas_cumprod"):
            raise RuntimeError(f"{type(self).__name__} has no noise schedule; build it with noise_schedule_config")
        noise = torch.randn_like(x_start) if noise is None else noise
        a = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape).to(x_start)
        s = extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape).to(x_start)
        return a * x_start + s * noise.to(x_start)

    def forward(self, x: torch.Tensor):
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """The low-res image as it is, at the constant noise level 0."""

    def __init__(self):
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros(x.shape[0], device=x.device, dtype=torch.long)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """The low-res image noised to ``noise_level`` (random in [0, max_noise_level) per sample when not given)."""

    def __init__(self, noise_schedule_config: dict, max_noise_level: int = 1000, to_cuda: bool = False):
        super().__init__(noise_schedule_config=noise_schedule_config)
        if not 0 < max_noise_level <= self.num_timesteps:
            raise ValueError(f"max_noise_level must be in [1, {self.num_timesteps}], got {max_noise_level}")
        self.max_noise_level = max_noise_level  # to_cuda: upstream's unused flag, accepted for its configs

    def forward(self, x: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noised image, noise levels [B] long). ``noise``: the Gaussian noise to use (seeded sampling)."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device).long()
        elif not isinstance(noise_level, torch.Tensor):
            raise TypeError(f"noise_level must be a tensor of levels, one per image, got {type(noise_level).__name__}")
        return self.q_sample(x, noise_level.long(), noise), noise_level
