"""``DDIMSampler``: the CompVis class API as a thin front over the shared sampling core.

Same arguments and semantics as CompVis (``make_schedule``, ``sample``, ``stochastic_encode`` /
``decode`` for img2img), but no hard-coded device: tensors follow the model.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm.models.diffusion.sampling import DiscreteDenoiser
from ldm.models.diffusion.sampling.core import sample as core_sample
from ldm.models.diffusion.sampling.discretization import compvis_timesteps, sigmas_from_timesteps


class DDIMSampler:
    sampler_name = "ddim"

    def __init__(self, model: torch.nn.Module, schedule: str = "linear", device: Any = None, **kwargs: Any):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.denoiser = DiscreteDenoiser(model)
        self.ddim_timesteps: Optional[np.ndarray] = None
        self.ddim_eta = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True) -> None:
        """Pick the DDIM timesteps and the CompVis per-step tables (alphas, sigmas)."""
        self._check_eta(ddim_eta)
        self.ddim_timesteps = compvis_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        self.ddim_eta = float(ddim_eta)
        ac = self.model.alphas_cumprod.detach().cpu().double().numpy()
        self.ddim_alphas = ac[self.ddim_timesteps]
        self.ddim_alphas_prev = np.asarray([ac[0]] + ac[self.ddim_timesteps[:-1]].tolist())
        self.ddim_sigmas = ddim_eta * np.sqrt((1 - self.ddim_alphas_prev) / (1 - self.ddim_alphas) * (1 - self.ddim_alphas / self.ddim_alphas_prev))
        self.ddim_sqrt_one_minus_alphas = np.sqrt(1.0 - self.ddim_alphas)

    def _check_eta(self, eta: float) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

    def _sigmas(self, t_start: Optional[int] = None) -> torch.Tensor:
        ts = self.ddim_timesteps if t_start is None else self.ddim_timesteps[:t_start]
        return sigmas_from_timesteps(self.denoiser, ts, final="t0")

    def _run(self, x_T: torch.Tensor, sigmas: torch.Tensor, conditioning: Any, eta: float, scale: float, uc: Any,
             callback: Optional[Callable], img_callback: Optional[Callable], mask=None, x0=None, verbose: bool = True,
             log_every_t: int = 100, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, dict]:
        intermediates: dict[str, list] = {"x_inter": [x_T], "pred_x0": [x_T]}
        total = len(sigmas) - 1

        def on_step(info: dict) -> None:
            i = info["i"]
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(info["denoised"], i)
            if i % log_every_t == 0 or i == total - 1:
                s = info["sigma"]
                intermediates["x_inter"].append(info["x"] / (1 + s**2).sqrt())
                intermediates["pred_x0"].append(info["denoised"])

        samples = core_sample(
            self.model, conditioning, uncond=uc if scale != 1.0 else None, guidance_scale=scale,
            guidance_rescale=guidance_rescale, sampler=self.sampler_name, sigmas=sigmas, x_T=x_T,
            eta=eta if self.sampler_name == "ddim" else None, init_latent=x0 if mask is not None else None,
            keep_mask=mask, callback=on_step, progress=verbose, denoiser=self.denoiser,
        )
        return samples, intermediates

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning: Any = None, callback: Optional[Callable] = None,
               normals_sequence=None, img_callback: Optional[Callable] = None, quantize_x0: bool = False, eta: float = 0.0,
               mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None, temperature: float = 1.0,
               noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold=None, guidance_rescale: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, dict]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` steps; returns (samples, intermediates)."""
        unsupported = {"score_corrector": score_corrector, "dynamic_threshold": dynamic_threshold,
                       "normals_sequence": normals_sequence}
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"{name} is not supported by this DDIMSampler")
        if quantize_x0 or temperature != 1.0 or noise_dropout != 0.0:
            raise NotImplementedError("quantize_x0, temperature and noise_dropout are not supported")
        self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), device=self.device)
        return self._run(x_T, self._sigmas(), conditioning, eta, unconditional_guidance_scale, unconditional_conditioning,
                         callback, img_callback, mask, x0, verbose, log_every_t, guidance_rescale)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise ``x0`` to the level of DDIM step index ``t`` (CompVis img2img's first half)."""
        ac = self.model.alphas_cumprod.detach().cpu().double()
        a = ac if use_original_steps else torch.from_numpy(self.ddim_alphas)
        a_t = a[t.cpu().long()].to(x0.device, x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        noise = torch.randn_like(x0) if noise is None else noise
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False, callback: Optional[Callable] = None,
               **kwargs: Any) -> torch.Tensor:
        """Denoise ``x_latent`` through the first ``t_start`` DDIM timesteps, from the highest down."""
        if use_original_steps:
            raise NotImplementedError("use_original_steps is not supported; use the DDPM sampler")
        samples, _ = self._run(x_latent, self._sigmas(t_start), cond, self.ddim_eta, unconditional_guidance_scale,
                               unconditional_conditioning, callback, None, verbose=kwargs.get("verbose", True))
        return samples
