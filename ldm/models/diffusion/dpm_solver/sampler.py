"""``DPMSolverSampler``: the CompVis / SD 2 class over the sampling core's DPM-Solver++ multistep.

Upstream runs DPM-Solver++ (data prediction, multistep, order 2, ``lower_order_final``) on steps
uniform in continuous time from t = 1 to t = 1/N, i.e. the training timesteps 999 .. 0 evenly spaced
(fractional in between), ending at the level of timestep 0 without a last model call. Here the
same schedule is fed to :func:`ldm.models.diffusion.sampling.solvers.sample_dpmpp_multistep`
(``order`` 1-3), with the same guidance core as every other sampler; eps and v models alike.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.sampling import DiscreteDenoiser, solvers
from ldm.models.diffusion.sampling.core import sample as core_sample
from ldm.models.diffusion.sampling.discretization import sigmas_from_timesteps


def time_uniform_sigmas(denoiser: DiscreteDenoiser, steps: int) -> torch.Tensor:
    """Upstream's ``skip_type="time_uniform"`` for a discrete-time model: ``steps`` levels at the timesteps
    ``linspace(N - 1, 0, steps + 1)[:-1]``, then the level of timestep 0 to end at."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    n = denoiser.num_timesteps
    timesteps = np.linspace(0, n - 1, steps + 1)[1:]  # ascending; the final t = 0 is the "t0" end level
    return sigmas_from_timesteps(denoiser, timesteps, final="t0")


class DPMSolverSampler:
    """``DPMSolverSampler(model).sample(S, batch_size, shape, conditioning, ...)`` -> ``(samples, None)``."""

    def __init__(self, model: torch.nn.Module, device: Any = None, order: int = 2) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"DPMSolverSampler order must be 1, 2 or 3, got {order}")
        self.model, self.order = model, order
        self.denoiser = DiscreteDenoiser(model)
        self.alphas_cumprod = model.alphas_cumprod.detach().clone().float()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def register_buffer(self, name: str, attr: Any) -> None:
        """Upstream's way of storing schedule tensors (kept on the model's device)."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.device)
        setattr(self, name, attr)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable] = None, normals_sequence: Any = None, img_callback: Optional[Callable] = None,
               quantize_x0: bool = False, eta: float = 0.0, mask: Optional[torch.Tensor] = None,
               x0: Optional[torch.Tensor] = None, temperature: float = 1.0, noise_dropout: float = 0.0,
               score_corrector: Any = None, corrector_kwargs: Optional[dict] = None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None) -> tuple[torch.Tensor, None]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` model calls (upstream's arguments;
        ``mask`` + ``x0`` inpaint by latent blending). Options upstream accepts but DPM-Solver ignores
        (``eta``, ``log_every_t``) are accepted; the ones that would change the result and are not implemented
        (``score_corrector``, ``quantize_x0``, ``temperature`` != 1, ``noise_dropout``, ``normals_sequence``)
        raise instead of being dropped silently."""
        for name, value in (("score_corrector", score_corrector), ("normals_sequence", normals_sequence),
                            ("corrector_kwargs", corrector_kwargs)):
            if value is not None:
                raise NotImplementedError(f"DPMSolverSampler: {name} is not supported")
        if quantize_x0 or temperature != 1.0 or noise_dropout != 0.0:
            raise NotImplementedError("DPMSolverSampler: quantize_x0, temperature and noise_dropout are not supported")
        if eta != 0:
            raise ValueError(f"DPMSolverSampler is deterministic: eta must be 0, got {eta}")
        if mask is not None and x0 is None:
            raise ValueError("DPMSolverSampler: mask needs x0 (the latent to keep)")
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), device=self.device)
        def on_step(info: dict) -> None:
            if callback is not None:
                callback(info["i"])
            if img_callback is not None:
                img_callback(info["denoised"], info["i"])

        samples = core_sample(
            self.model, conditioning, uncond=unconditional_conditioning if unconditional_guidance_scale != 1.0 else None,
            guidance_scale=unconditional_guidance_scale, sampler="dpmpp_2m", sigmas=time_uniform_sigmas(self.denoiser, S),
            x_T=x_T, init_latent=x0 if mask is not None else None, keep_mask=mask, callback=on_step, progress=verbose,
            denoiser=self.denoiser,
            solver=lambda d, x, s, step, noise=None: solvers.sample_dpmpp_multistep(d, x, s, step, noise, order=self.order),
        )
        return samples.to(self.device), None
