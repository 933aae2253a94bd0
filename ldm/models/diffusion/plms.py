"""``PLMSSampler``: CompVis' pseudo linear multistep sampler (Liu et al. 2022), upstream's class API.

``sample`` runs on the shared sampling core unless a per-step feature is asked for (``score_corrector``,
``dynamic_threshold``, ``quantize_x0``, ``mask``, ``temperature`` / ``noise_dropout``) or a subclass
overrides ``p_sample_plms`` / ``plms_sampling``; then upstream's loop, ``plms_sampling`` over
``p_sample_plms``, runs. Both give the same samples to float round-off.

Unlike SD 2's PLMS, which extrapolates the raw network outputs, v models are converted to eps at every
step before the multistep formula (the parity tests show the difference to diffusers' PNDM).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import CompVisSampler, _bcast


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """SD 2's ``dynamic_threshold``: scale each sample down so its RMS is at most ``value``."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms).reshape(-1, *([1] * (x0.dim() - 1)))


class PLMSSampler(CompVisSampler):
    """``PLMSSampler(model, schedule="linear", device=None)``; PLMS is deterministic: ``eta`` must be 0."""

    sampler_name = "plms"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS, got {eta}")

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning: Any = None, callback: Optional[Callable] = None,
               normals_sequence=None, img_callback: Optional[Callable] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
               verbose: bool = True, x_T: Optional[torch.Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               dynamic_threshold=None, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` PLMS steps -> (samples, intermediates).

        Upstream's arguments (see ``DDIMSampler.sample``); ``eta`` must be 0 (ValueError otherwise),
        ``dynamic_threshold=v`` rescales each ``pred_x0`` to an RMS of at most ``v`` (SD 2's norm thresholding);
        ``temperature`` and ``noise_dropout`` act on noise that PLMS (eta 0) does not inject.
        """
        del normals_sequence  # unused, as upstream
        # One step: upstream evaluates its second point at the same timestep (the core would not).
        return self._sample(
            S, batch_size, shape, conditioning, eta=eta, verbose=verbose, quantize_x0=quantize_x0, mask=mask, x0=x0,
            per_step=lambda: (score_corrector is not None or dynamic_threshold is not None or quantize_x0
                              or mask is not None or temperature != 1.0 or noise_dropout != 0.0
                              or len(self.ddim_timesteps) < 2
                              or self._overridden(PLMSSampler, "p_sample_plms", "plms_sampling")),
            loop=self.plms_sampling,
            loop_options=dict(noise_dropout=noise_dropout, temperature=temperature, score_corrector=score_corrector,
                              corrector_kwargs=corrector_kwargs, dynamic_threshold=dynamic_threshold),
            x_T=x_T, callback=callback, img_callback=img_callback, log_every_t=log_every_t,
            scale=unconditional_guidance_scale, uc=unconditional_conditioning, guidance_rescale=guidance_rescale,
            core_eta=None)

    @torch.no_grad()
    def plms_sampling(self, cond: Any, shape, x_T: Optional[torch.Tensor] = None, ddim_use_original_steps: bool = False,
                      callback: Optional[Callable] = None, timesteps: Optional[int] = None,
                      quantize_denoised: bool = False, mask: Optional[torch.Tensor] = None,
                      x0: Optional[torch.Tensor] = None, img_callback: Optional[Callable] = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      dynamic_threshold=None) -> tuple[torch.Tensor, dict]:
        """Upstream's loop: ``p_sample_plms`` from the highest timestep down, keeping the last three eps.

        ``shape`` is the full (B, C, H, W); ``timesteps`` (an int) runs only the lowest ``timesteps`` steps.
        """
        self._require_schedule()
        device = self.device
        b = shape[0]
        img = torch.randn(shape, device=device) if x_T is None else x_T
        time_range = np.flip(self._loop_timesteps(timesteps, ddim_use_original_steps))
        total = len(time_range)
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the latent to keep where mask is 1)")
        intermediates: dict[str, list] = {"x_inter": [img], "pred_x0": [img]}
        if self._verbose:
            print(f"Running PLMS Sampling with {total} timesteps")
        old_eps: list[torch.Tensor] = []
        for i, step in enumerate(tqdm(time_range, desc="PLMS Sampler", total=total, disable=not self._verbose)):
            index = total - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            ts_next = torch.full((b,), int(time_range[min(i + 1, total - 1)]), device=device, dtype=torch.long)
            if mask is not None:
                img = self._q_sample(x0, ts) * mask + (1.0 - mask) * img
            img, pred_x0, e_t = self.p_sample_plms(
                img, cond, ts, index=index, use_original_steps=ddim_use_original_steps,
                quantize_denoised=quantize_denoised, temperature=temperature, noise_dropout=noise_dropout,
                score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, old_eps=old_eps, t_next=ts_next,
                dynamic_threshold=dynamic_threshold)
            old_eps = (old_eps + [e_t])[-3:]
            self._report(i, index, total, img, pred_x0, callback, img_callback, log_every_t, intermediates)
        return img, intermediates

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      old_eps: Optional[list] = None, t_next: Optional[torch.Tensor] = None,
                      dynamic_threshold=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step -> (x_prev, pred_x0, e_t), ``e_t`` the model's eps at (x, t) for the history.

        With no history (``old_eps`` empty): a DDIM step to the next level, the model again there (at
        ``t_next``), and the step redone with the mean eps (pseudo improved Euler); with 1, 2, 3+ earlier eps:
        Adams-Bashforth of order 2, 3, 4 on eps, then the DDIM step with that eps.
        """
        old_eps = [] if old_eps is None else old_eps
        t_next = t if t_next is None else t_next

        def model_eps(x_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
            e, _ = self._model_eps(x_in, c, t_in, unconditional_guidance_scale, unconditional_conditioning)
            if score_corrector is not None:
                e = score_corrector.modify_score(self.model, e, x_in, t_in, c, **(corrector_kwargs or {}))
            return e

        alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = self._step_tables(use_original_steps)
        a_t, a_prev = _bcast(alphas[index], x), _bcast(alphas_prev[index], x)
        sigma_t, sqrt_one_minus_at = _bcast(sigmas[index], x), _bcast(sqrt_one_minus_alphas[index], x)

        def ddim_step(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pred_x0 = (x - sqrt_one_minus_at * e) / a_t.sqrt()
            if quantize_denoised:
                pred_x0 = self._quantize(pred_x0)
            if dynamic_threshold is not None:
                pred_x0 = norm_thresholding(pred_x0, dynamic_threshold)
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e
            noise = self._step_noise(x, sigma_t, repeat_noise, temperature, noise_dropout)
            return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

        e_t = model_eps(x, t)
        if len(old_eps) == 0:
            x_mid, _ = ddim_step(e_t)
            e_prime = (e_t + model_eps(x_mid, t_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = ddim_step(e_prime)
        return x_prev, pred_x0, e_t
