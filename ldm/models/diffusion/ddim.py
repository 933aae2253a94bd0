"""``DDIMSampler``: the CompVis / Stability SD 2 sampler class, with its public API.

Same names, signatures and return values as upstream (``make_schedule``, ``sample``, ``ddim_sampling``,
``p_sample_ddim``, ``encode`` / ``stochastic_encode`` / ``decode``), but no hard-coded device (tensors
follow the model, or ``device=``), no ``**kwargs`` (a misspelt keyword is a TypeError), and eps, v and x0
models alike: the model output goes through the same guidance core (:class:`CFGDenoiser` over
:class:`DiscreteDenoiser`) as every other sampler.

``sample`` runs on the shared sampling core (:func:`ldm.models.diffusion.sampling.core.sample`) unless a
per-step feature is asked for (``ucg_schedule``, ``score_corrector``, ``temperature`` != 1,
``noise_dropout``, ``quantize_x0``, ``mask``) or a subclass overrides ``p_sample_ddim`` /
``ddim_sampling``; then it runs upstream's loop, ``ddim_sampling`` over ``p_sample_ddim``. Both paths
give the same samples to float round-off (and draw the same noise, so also for ``eta > 0``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling import DiscreteDenoiser
from ldm.models.diffusion.sampling.core import sample as core_sample
from ldm.models.diffusion.sampling.discretization import sigmas_from_timesteps
from ldm.models.diffusion.sampling.guidance import CFGDenoiser
from ldm.modules.diffusionmodules.util import (
    extract_into_tensor, make_ddim_sampling_parameters, make_ddim_timesteps, noise_like,
)
from ldm.offload import execution_device


def _warn_batch_size(conditioning: Any, batch_size: int) -> None:
    """Upstream's warning when the conditioning's batch is not ``batch_size``."""
    first = conditioning
    while isinstance(first, (dict, list, tuple)):
        first = (next(iter(first.values()), None) if isinstance(first, dict) else (first[0] if first else None))
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] != batch_size:
        warnings.warn(f"Got {first.shape[0]} conditionings but batch-size is {batch_size}", stacklevel=3)


def _bcast(value: Any, x: torch.Tensor) -> torch.Tensor:
    """A per-step scalar as a [B, 1, 1, ...] tensor on x's device (float32, as upstream's ``torch.full``)."""
    return torch.full((x.shape[0], *([1] * (x.dim() - 1))), float(value), device=x.device)


class CompVisSampler:
    """What DDIM and PLMS share: the model, the device, ``make_schedule``'s tables, guided model calls."""

    sampler_name = "ddim"

    def __init__(self, model: torch.nn.Module, schedule: str = "linear", device: Any = None):
        self.model = model
        self.ddpm_num_timesteps = int(getattr(model, "num_timesteps", 0) or len(model.alphas_cumprod))
        self.schedule = schedule
        self._device = None if device is None else torch.device(device)
        self.denoiser = DiscreteDenoiser(model)
        self.ddim_timesteps: Optional[np.ndarray] = None
        self.ddim_eta = 0.0
        self._verbose = True  # progress bars of the loops (``sample(verbose=...)`` sets it for its run)
        self._guidance_rescale = 0.0  # ``sample(guidance_rescale=...)`` for the loops' model calls

    # ---- device and tables ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """``device=`` if given, else where the model computes."""
        return self._device if self._device is not None else execution_device(self.model)

    @device.setter
    def device(self, value: Any) -> None:
        self._device = None if value is None else torch.device(value)

    def register_buffer(self, name: str, attr: Any) -> None:
        """Store ``attr`` as ``self.<name>``, a tensor on the sampler's device (non-tensors as they are)."""
        if isinstance(attr, torch.Tensor) and attr.device != self.device:
            if self.device.type == "mps" and attr.dtype == torch.float64:  # MPS has no float64
                attr = attr.float()
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def _check_eta(self, eta: float) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick the DDIM timesteps and register upstream's tables.

        As upstream: ``ddim_timesteps`` a NumPy int array (ascending), float32 tensors ``betas``,
        ``alphas_cumprod``, ``alphas_cumprod_prev``, ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
        ``log_one_minus_alphas_cumprod``, ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``,
        ``ddim_alphas``, ``ddim_sqrt_one_minus_alphas``, ``ddim_sigmas_for_original_num_steps``; ``ddim_sigmas``
        a float64 tensor; ``ddim_alphas_prev`` a float64 NumPy array.

        Step counts: exactly ``ddim_num_steps`` steps for every count in ``[1, T]``. Upstream takes every
        ``T // S``-th timestep, which for an ``S`` that does not divide ``T`` gives extra steps (30 -> 31)
        and for some (e.g. ``S = 3``: timesteps 1, 334, 667, 1000) a last one past the schedule (IndexError);
        here the first ``S`` of those are used (diffusers' "leading" spacing), and ``S = T`` runs every
        trained timestep. For counts dividing ``T`` nothing changes. See :func:`make_ddim_timesteps`.
        """
        self._check_eta(ddim_eta)
        self.ddim_timesteps = make_ddim_timesteps(ddim_discr_method=ddim_discretize, num_ddim_timesteps=ddim_num_steps,
                                                  num_ddpm_timesteps=self.ddpm_num_timesteps, verbose=verbose)
        self.ddim_eta = float(ddim_eta)
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"alphas have to be defined for each timestep: {alphas_cumprod.shape[0]} alphas_cumprod "
                             f"for {self.ddpm_num_timesteps} timesteps")
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        prev = getattr(self.model, "alphas_cumprod_prev", None)
        prev = torch.cat([ac.new_ones(1), ac[:-1]]) if prev is None else prev.detach().to("cpu", torch.float64)
        betas = getattr(self.model, "betas", None)
        betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]]) if betas is None else betas.detach().to("cpu", torch.float64)

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.to(torch.float32)

        self.register_buffer("betas", f32(betas))
        self.register_buffer("alphas_cumprod", f32(ac))
        self.register_buffer("alphas_cumprod_prev", f32(prev))
        self.register_buffer("sqrt_alphas_cumprod", f32(ac.sqrt()))
        self.register_buffer("sqrt_one_minus_alphas_cumprod", f32((1 - ac).sqrt()))
        self.register_buffer("log_one_minus_alphas_cumprod", f32((1 - ac).log()))
        self.register_buffer("sqrt_recip_alphas_cumprod", f32((1 / ac).sqrt()))
        self.register_buffer("sqrt_recipm1_alphas_cumprod", f32((1 / ac - 1).sqrt()))

        ddim_sigmas, ddim_alphas, ddim_alphas_prev = make_ddim_sampling_parameters(
            alphacums=f32(ac), ddim_timesteps=self.ddim_timesteps, eta=ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", ddim_sigmas)
        self.register_buffer("ddim_alphas", ddim_alphas)
        self.register_buffer("ddim_alphas_prev", ddim_alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", (1.0 - ddim_alphas).sqrt())
        # The same eta-sigmas for a step to the previous trained timestep (``use_original_steps``).
        sigmas_original = ddim_eta * ((1 - prev) / (1 - ac) * (1 - ac / prev)).sqrt()
        self.register_buffer("ddim_sigmas_for_original_num_steps", f32(sigmas_original))

    def _require_schedule(self) -> None:
        if self.ddim_timesteps is None or not hasattr(self, "ddim_alphas"):
            raise RuntimeError(f"{type(self).__name__}: call make_schedule(ddim_num_steps, ...) first")

    def _step_tables(self, use_original_steps: bool):
        """(alphas, alphas_prev, sqrt_one_minus_alphas, sigmas) indexed by the step index."""
        if use_original_steps:
            return (self.alphas_cumprod, self.alphas_cumprod_prev, self.sqrt_one_minus_alphas_cumprod,
                    self.ddim_sigmas_for_original_num_steps)
        return self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sqrt_one_minus_alphas, self.ddim_sigmas

    def _loop_timesteps(self, timesteps: Optional[int], use_original_steps: bool) -> np.ndarray:
        """Ascending timesteps a loop visits. ``timesteps`` (an int) keeps the lowest ``timesteps`` steps."""
        if use_original_steps:
            return np.arange(self.ddpm_num_timesteps if timesteps is None else int(timesteps))
        self._require_schedule()
        if timesteps is None:
            return self.ddim_timesteps
        return self.ddim_timesteps[: max(0, min(int(timesteps), len(self.ddim_timesteps)))]

    # ---- model calls ----------------------------------------------------------------------
    def _model_eps(self, x: torch.Tensor, c: Any, t: torch.Tensor, scale: float = 1.0, uc: Any = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) the (guided) model predicts for the latent ``x`` fed at integer timesteps ``t``.

        The model sees exactly ``(x, t, c)`` (and the unconditional branch batched with it, as upstream);
        its eps / v / x0 output is converted with the training conversions by :class:`DiscreteDenoiser`.
        """
        t = torch.as_tensor(t).reshape(-1).long()
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        sigma = self.denoiser.sigmas[t.cpu()].to(x.device)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        x_ve = x * (1 + s**2).sqrt()  # the sampling core's variance-exploding form, which the denoiser takes
        guided = CFGDenoiser(self.denoiser, c, uc if scale != 1.0 else None, float(scale), self._guidance_rescale)
        x0 = guided(x_ve, sigma)
        return (x_ve - x0) / s, x0

    def _quantize(self, pred_x0: torch.Tensor) -> torch.Tensor:
        quantize = getattr(getattr(self.model, "first_stage_model", None), "quantize", None)
        if not callable(quantize):
            stage = type(getattr(self.model, "first_stage_model", None)).__name__
            raise ValueError(f"quantize_x0 / quantize_denoised needs a vector-quantized first stage (a VQModel with "
                             f"quantize()); this model's first stage is {stage}")
        out = quantize(pred_x0)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _q_sample(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q_sample = getattr(self.model, "q_sample", None)
        if callable(q_sample):
            return q_sample(x0, t)
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x0.shape).to(x0.device) * x0
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x0.shape).to(x0.device) * torch.randn_like(x0))

    def _step_noise(self, x: torch.Tensor, sigma_t: torch.Tensor, repeat_noise: bool, temperature: float,
                    noise_dropout: float) -> torch.Tensor:
        noise = sigma_t * noise_like(x.shape, x.device, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        return noise

    # ---- the core path --------------------------------------------------------------------
    def _run(self, x_T: torch.Tensor, sigmas: torch.Tensor, conditioning: Any, eta: Optional[float], scale: float,
             uc: Any, callback: Optional[Callable], img_callback: Optional[Callable], log_every_t: int = 100,
             verbose: bool = True, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Run the shared sampling core; intermediates as upstream's loop logs them (after the steps
        whose index ``total - 1 - i`` is a multiple of ``log_every_t``, and after the first)."""
        intermediates: dict[str, list] = {"x_inter": [x_T], "pred_x0": [x_T]}
        total = len(sigmas) - 1

        def logged(i: int) -> bool:
            return (total - 1 - i) % log_every_t == 0 or i == 0

        def on_step(info: dict) -> None:
            i = info["i"]
            if i > 0 and logged(i - 1):  # the latent after step i - 1 is the one step i starts from
                intermediates["x_inter"].append(info["x"] / (1 + info["sigma"] ** 2).sqrt())
            if logged(i):
                intermediates["pred_x0"].append(info["denoised"])
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(info["denoised"], i)

        samples = core_sample(
            self.model, conditioning, uncond=uc if scale != 1.0 else None, guidance_scale=scale,
            guidance_rescale=guidance_rescale, sampler=self.sampler_name, sigmas=sigmas, x_T=x_T, eta=eta,
            callback=on_step, progress=verbose, denoiser=self.denoiser,
        )
        if total > 0 and logged(total - 1):
            intermediates["x_inter"].append(samples)
        return samples, intermediates

    def _sample(self, S: int, batch_size: int, shape, conditioning: Any, *, eta: float, verbose: bool,
                quantize_x0: bool, mask: Optional[torch.Tensor], x0: Optional[torch.Tensor],
                per_step: Callable[[], bool], loop: Callable[..., tuple[torch.Tensor, dict]], loop_options: dict,
                x_T: Optional[torch.Tensor], callback: Optional[Callable], img_callback: Optional[Callable],
                log_every_t: int, scale: float, uc: Any, guidance_rescale: float, core_eta: Optional[float]):
        """What ``sample`` does for DDIM and PLMS: check, make the schedule, then run upstream's per-step ``loop``
        when a per-step feature (or a subclass's override) asks for it, else the shared core."""
        if quantize_x0:
            self._check_quantize()
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the latent to keep where mask is 1)")
        if conditioning is not None:
            _warn_batch_size(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            print(f"Data shape for {self.sampler_name.upper()} sampling is {size}" +
                  (f", eta {eta}" if self.sampler_name == "ddim" else ""))
        self._verbose, self._guidance_rescale = verbose, float(guidance_rescale)
        try:
            if per_step():
                return loop(conditioning, size, callback=callback, img_callback=img_callback,
                            quantize_denoised=quantize_x0, mask=mask, x0=x0, ddim_use_original_steps=False, x_T=x_T,
                            log_every_t=log_every_t, unconditional_guidance_scale=scale,
                            unconditional_conditioning=uc, **loop_options)
            if x_T is None:
                x_T = torch.randn(size, device=self.device)
            sigmas = sigmas_from_timesteps(self.denoiser, self.ddim_timesteps, final="t0")
            return self._run(x_T, sigmas, conditioning, core_eta, scale, uc, callback, img_callback, log_every_t,
                             verbose, guidance_rescale)
        finally:
            self._verbose, self._guidance_rescale = True, 0.0

    @staticmethod
    def _report(i: int, index: int, total: int, img: torch.Tensor, pred_x0: torch.Tensor, callback: Optional[Callable],
                img_callback: Optional[Callable], log_every_t: int, intermediates: dict) -> None:
        """After step ``i`` of upstream's loops: the callbacks, and every ``log_every_t``-th state kept."""
        if callback:
            callback(i)
        if img_callback:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(img)
            intermediates["pred_x0"].append(pred_x0)

    def _overridden(self, base: type, *names: str) -> bool:
        """Whether a subclass of ``base`` (or the instance itself) replaces one of these methods."""
        return any(name in self.__dict__ or getattr(type(self), name) is not getattr(base, name) for name in names)

    def _check_quantize(self) -> None:
        """The explanatory error of :meth:`_quantize`, raised before sampling starts."""
        if not callable(getattr(getattr(self.model, "first_stage_model", None), "quantize", None)):
            self._quantize(torch.zeros(0))


class DDIMSampler(CompVisSampler):
    """Denoising diffusion implicit models (Song et al. 2020), upstream's class API.

    ``DDIMSampler(model, schedule="linear", device=None)``; ``device`` defaults to where the model computes.
    """

    sampler_name = "ddim"

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape, conditioning: Any = None, callback: Optional[Callable] = None,
               normals_sequence=None, img_callback: Optional[Callable] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
               verbose: bool = True, x_T: Optional[torch.Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               dynamic_threshold=None, ucg_schedule=None, guidance_rescale: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in ``S`` DDIM steps -> (samples, intermediates).

        ``intermediates``: ``{"x_inter": [...], "pred_x0": [...]}`` (the start, then every ``log_every_t``-th
        step, as upstream). ``ucg_schedule``: one guidance scale per step. ``score_corrector``: an object whose
        ``modify_score(model, e_t, x, t, c, **corrector_kwargs)`` returns a corrected eps. ``temperature``
        scales the injected noise (so it matters only with ``eta > 0``), ``noise_dropout`` drops it.
        ``quantize_x0`` needs a VQ first stage. ``mask`` (1 = keep) with ``x0``: upstream's latent blending, x0
        noised with ``q_sample`` to each step's level. ``dynamic_threshold`` is not implemented (as upstream);
        ``normals_sequence`` is accepted and unused (as upstream). ``guidance_rescale`` (ours): Lin et al.'s
        rescale of the guided prediction.
        """
        del normals_sequence  # unused, as upstream
        if dynamic_threshold is not None:
            raise NotImplementedError("dynamic_threshold is not implemented for DDIM (as upstream); "
                                      "PLMSSampler supports it")
        return self._sample(
            S, batch_size, shape, conditioning, eta=eta, verbose=verbose, quantize_x0=quantize_x0, mask=mask, x0=x0,
            per_step=lambda: (ucg_schedule is not None or score_corrector is not None or temperature != 1.0
                              or noise_dropout != 0.0 or quantize_x0 or mask is not None
                              or self._overridden(DDIMSampler, "p_sample_ddim", "ddim_sampling")),
            loop=self.ddim_sampling,
            loop_options=dict(noise_dropout=noise_dropout, temperature=temperature, score_corrector=score_corrector,
                              corrector_kwargs=corrector_kwargs, dynamic_threshold=dynamic_threshold,
                              ucg_schedule=ucg_schedule),
            x_T=x_T, callback=callback, img_callback=img_callback, log_every_t=log_every_t,
            scale=unconditional_guidance_scale, uc=unconditional_conditioning, guidance_rescale=guidance_rescale,
            core_eta=eta)

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape, x_T: Optional[torch.Tensor] = None, ddim_use_original_steps: bool = False,
                      callback: Optional[Callable] = None, timesteps: Optional[int] = None,
                      quantize_denoised: bool = False, mask: Optional[torch.Tensor] = None,
                      x0: Optional[torch.Tensor] = None, img_callback: Optional[Callable] = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      dynamic_threshold=None, ucg_schedule=None) -> tuple[torch.Tensor, dict]:
        """Upstream's loop: ``p_sample_ddim`` from the highest DDIM timestep down -> (img, intermediates).

        ``shape`` is the full (B, C, H, W). ``timesteps`` (an int) runs only the lowest ``timesteps`` DDIM
        steps (upstream ran one fewer); with ``ddim_use_original_steps`` every trained timestep below it.
        ``ucg_schedule``: a guidance scale per step (its length must be the number of steps).
        """
        device = self.device
        b = shape[0]
        self._require_schedule()
        img = torch.randn(shape, device=device) if x_T is None else x_T
        steps = self._loop_timesteps(timesteps, ddim_use_original_steps)
        total = len(steps)
        if ucg_schedule is not None and len(ucg_schedule) != total:
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {total} steps; give one per step")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the latent to keep where mask is 1)")
        intermediates: dict[str, list] = {"x_inter": [img], "pred_x0": [img]}
        if self._verbose:
            print(f"Running DDIM Sampling with {total} timesteps")
        for i, step in enumerate(tqdm(np.flip(steps), desc="DDIM Sampler", total=total, disable=not self._verbose)):
            index = total - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                img = self._q_sample(x0, ts) * mask + (1.0 - mask) * img
            scale = unconditional_guidance_scale if ucg_schedule is None else ucg_schedule[i]
            img, pred_x0 = self.p_sample_ddim(
                img, cond, ts, index=index, use_original_steps=ddim_use_original_steps,
                quantize_denoised=quantize_denoised, temperature=temperature, noise_dropout=noise_dropout,
                score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=scale, unconditional_conditioning=unconditional_conditioning,
                dynamic_threshold=dynamic_threshold)
            self._report(i, index, total, img, pred_x0, callback, img_callback, log_every_t, intermediates)
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      dynamic_threshold=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``x`` (model timestep ``t``, step ``index`` of the tables) -> (x_prev, pred_x0).

        ``x_prev = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma_t^2) * e_t + sigma_t * temperature * noise``
        (Song et al. 2020, eq. 12) with ``a``, ``a_prev``, ``sigma_t`` the ``index``-th DDIM values (or the trained
        ones with ``use_original_steps``). ``e_t``: the guided model output as eps (v and x0 models converted);
        ``score_corrector.modify_score(model, e_t, x, t, c, **corrector_kwargs)`` may replace it (for any
        parameterization, where upstream allowed only eps).
        """
        if dynamic_threshold is not None:
            raise NotImplementedError("dynamic_threshold is not implemented for DDIM (as upstream)")
        e_t, x0_model = self._model_eps(x, c, t, unconditional_guidance_scale, unconditional_conditioning)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        alphas, alphas_prev, sqrt_one_minus_alphas, sigmas = self._step_tables(use_original_steps)
        a_t, a_prev = _bcast(alphas[index], x), _bcast(alphas_prev[index], x)
        sigma_t, sqrt_one_minus_at = _bcast(sigmas[index], x), _bcast(sqrt_one_minus_alphas[index], x)
        if getattr(self.model, "parameterization", "eps") == "eps" or score_corrector is not None:
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        else:  # v / x0 models: the model's own x0, as upstream's predict_start_from_z_and_v
            pred_x0 = x0_model
        if quantize_denoised:
            pred_x0 = self._quantize(pred_x0)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = self._step_noise(x, sigma_t, repeat_noise, temperature, noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

    # ---- img2img ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x0: torch.Tensor, c: Any, t_enc: int, use_original_steps: bool = False,
               return_intermediates: Optional[int] = None, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, callback: Optional[Callable] = None) -> tuple[torch.Tensor, dict]:
        """Deterministic DDIM inversion (SD 2): run the DDIM ODE upward through the first ``t_enc`` steps.

        Step ``i`` moves from level ``ddim_alphas_prev[i]`` to ``ddim_alphas[i]`` (the trained levels with
        ``use_original_steps``) with the eps the model predicts at the target timestep:
        ``x <- sqrt(a_next / a) x + sqrt(a_next) (sqrt(1 / a_next - 1) - sqrt(1 / a - 1)) eps``, so that
        :meth:`decode` with the same steps approximately undoes it. Returns ``(x_encoded, out)`` with
        ``out = {"x_encoded", "intermediate_steps"[, "intermediates"]}`` as upstream.

        Upstream fed the model the loop counter ``i`` as timestep for DDIM steps (the timestep of the
        ``i``-th trained step, not of the ``i``-th DDIM step); here it is the DDIM step's timestep, which is
        what the ``use_original_steps`` branch (where the two agree) does. ``return_intermediates=k`` keeps
        about ``k`` of the latents on the way (and the last two).
        """
        self._require_schedule()
        num_reference = self.ddpm_num_timesteps if use_original_steps else len(self.ddim_timesteps)
        if not 0 <= int(t_enc) <= num_reference:
            raise ValueError(f"t_enc must be in [0, {num_reference}], got {t_enc}")
        if unconditional_guidance_scale != 1.0 and unconditional_conditioning is None:
            raise ValueError("unconditional_guidance_scale != 1 needs unconditional_conditioning")
        num_steps = int(t_enc)
        if use_original_steps:
            steps = np.arange(num_steps)
            alphas_next, alphas = self.alphas_cumprod[:num_steps], self.alphas_cumprod_prev[:num_steps]
        else:
            steps = self.ddim_timesteps[:num_steps]
            alphas_next, alphas = self.ddim_alphas[:num_steps], torch.as_tensor(self.ddim_alphas_prev[:num_steps])
        every = max(1, num_steps // return_intermediates) if return_intermediates else 0
        x_next = x0
        intermediates, inter_steps = [], []
        for i in tqdm(range(num_steps), desc="Encoding Image", disable=not self._verbose):
            t = torch.full((x0.shape[0],), int(steps[i]), device=x0.device, dtype=torch.long)
            eps, _ = self._model_eps(x_next, c, t, unconditional_guidance_scale, unconditional_conditioning)
            a_next, a = float(alphas_next[i]), float(alphas[i])
            x_next = (a_next / a) ** 0.5 * x_next + a_next**0.5 * ((1 / a_next - 1) ** 0.5 - (1 / a - 1) ** 0.5) * eps
            if return_intermediates and ((i % every == 0 and i < num_steps - 1) or i >= num_steps - 2):
                intermediates.append(x_next)
                inter_steps.append(i)
            if callback:
                callback(i)
        out = {"x_encoded": x_next, "intermediate_steps": inter_steps}
        if return_intermediates:
            out["intermediates"] = intermediates
        return x_next, out

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise ``x0`` to DDIM step index ``t`` [B] (a trained timestep with ``use_original_steps``):
        ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``. Fast, but not exactly invertible (see :meth:`encode`)."""
        self._require_schedule()
        if use_original_steps:
            sqrt_a, sqrt_one_minus_a = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a, sqrt_one_minus_a = self.ddim_alphas.sqrt(), self.ddim_sqrt_one_minus_alphas
        t = torch.as_tensor(t).reshape(-1).long()
        if t.numel() == 1:
            t = t.expand(x0.shape[0])
        noise = torch.randn_like(x0) if noise is None else noise
        return (extract_into_tensor(sqrt_a, t, x0.shape).to(x0.device, x0.dtype) * x0
                + extract_into_tensor(sqrt_one_minus_a, t, x0.shape).to(x0.device, x0.dtype) * noise)

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Optional[Callable] = None) -> torch.Tensor:
        """Denoise ``x_latent`` (at DDIM step ``t_start``'s level) through the first ``t_start`` DDIM steps,
        from the highest down, with the ``eta`` of :meth:`make_schedule` (img2img's second half)."""
        self._require_schedule()
        steps = (np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps)[:t_start]
        total = len(steps)
        if total == 0:
            return x_latent
        if not use_original_steps and not self._overridden(DDIMSampler, "p_sample_ddim"):
            sigmas = sigmas_from_timesteps(self.denoiser, steps, final="t0")
            samples, _ = self._run(x_latent, sigmas, cond, self.ddim_eta, unconditional_guidance_scale,
                                   unconditional_conditioning, callback, None, verbose=self._verbose)
            return samples.to(x_latent.dtype)
        x_dec = x_latent
        for i, step in enumerate(tqdm(np.flip(steps), desc="Decoding image", total=total, disable=not self._verbose)):
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            x_dec, _ = self.p_sample_ddim(x_dec, cond, ts, index=total - i - 1, use_original_steps=use_original_steps,
                                          unconditional_guidance_scale=unconditional_guidance_scale,
                                          unconditional_conditioning=unconditional_conditioning)
            if callback:
                callback(i)
        return x_dec
