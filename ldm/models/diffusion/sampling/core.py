"""The sampling driver: pick a solver and a discretization, add guidance and masks, run.

    latents = sample(model, cond, uncond=uc, guidance_scale=7.5, sampler="dpmpp_2m", steps=20,
                     shape=(4, 64, 64), seeds=[42, 43])
    images = model.decode_first_stage(latents)

Every image of a batch draws its noise from its own seeded CPU generator, so an image depends
only on its seed (not on its batch neighbours) and is the same on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling import consistency, solvers
from ldm.models.diffusion.sampling.approx import Approximations, approximations
from ldm.models.diffusion.sampling.denoiser import DiscreteDenoiser
from ldm.models.diffusion.sampling.discretization import get_sigmas
from ldm.models.diffusion.sampling.guidance import CFGDenoiser, MaskedDenoiser, guidance_input_dim, with_guidance_input
from ldm.offload import execution_device


@dataclass(frozen=True)
class SamplerSpec:
    fn: Callable
    discretization: str
    final: str = "zero"  # "t0": end at alpha_bar[0] like CompVis DDIM/PLMS
    options: dict = field(default_factory=dict)
    stochastic: bool = False
    schedule: bool = False  # the solver takes ``schedule=`` (the denoiser: sigma <-> training timestep)
    distilled: bool = False  # guidance_scale <= 1 means no guidance, one UNet call a step (diffusers' rule)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(solvers.sample_ancestral, "uniform", "t0", {"eta": 0.0}),
    "plms": SamplerSpec(solvers.sample_plms, "uniform", "t0"),
    "ddpm": SamplerSpec(solvers.sample_ancestral, "trailing", "zero", {"eta": 1.0}, stochastic=True),
    "euler": SamplerSpec(solvers.sample_euler, "karras"),
    "euler_a": SamplerSpec(solvers.sample_ancestral, "karras", "zero", {"eta": 1.0}, stochastic=True),
    "heun": SamplerSpec(solvers.sample_heun, "karras"),
    "dpmpp_2m": SamplerSpec(solvers.sample_dpmpp_2m, "karras"),
    "dpmpp_3m": SamplerSpec(solvers.sample_dpmpp_3m, "karras"),
    "dpmpp_2m_sde": SamplerSpec(solvers.sample_dpmpp_2m_sde, "karras", "zero", {"eta": 1.0}, stochastic=True),
    "lcm": SamplerSpec(consistency.sample_lcm, "lcm", stochastic=True, schedule=True, distilled=True),
    "tcd": SamplerSpec(consistency.sample_tcd, "lcm", "t0", {"eta": 0.3}, stochastic=True, schedule=True,
                       distilled=True),
}


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


MAX_SEED = 2**32 - 1  # torch's CPU generator keeps only the low 32 bits of a seed: larger ones would collide


class NoiseSource:
    """Per-image Gaussian noise from one seeded CPU generator per image."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        bad = [s for s in seeds if not 0 <= int(s) <= MAX_SEED]
        if bad:
            raise ValueError(f"seed {bad[0]} is outside [0, {MAX_SEED}]; use a 32-bit seed")
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.device, self.dtype = device, dtype

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators]).to(self.device, self.dtype)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.randn(like.shape[1:]).to(like.device, like.dtype)


def sample(
    model: torch.nn.Module,
    cond: Any,
    *,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    sampler: str = "ddim",
    steps: int = 50,
    shape: Optional[Sequence[int]] = None,
    seeds: Optional[Sequence[int]] = None,
    x_T: Optional[torch.Tensor] = None,
    eta: Optional[float] = None,
    discretization: Optional[str] = None,
    init_latent: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    keep_mask: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
    denoiser: Optional[DiscreteDenoiser] = None,
    sigmas: Optional[torch.Tensor] = None,
    denoising_start: Optional[float] = None,
    denoising_end: Optional[float] = None,
    noisy_latent: Optional[torch.Tensor] = None,
    start_latent: Optional[torch.Tensor] = None,
    solver: Optional[Callable[..., torch.Tensor]] = None,
    approx: Optional[Approximations] = None,
) -> torch.Tensor:
    """Sample latents (in the model's own latent scale: decode with ``decode_first_stage``).

    ``x_T``: unit-variance starting noise (else drawn from ``seeds``). ``init_latent`` + ``strength``:
    SDEdit img2img, running the last ``int(strength * steps)`` steps from ``init_latent`` noised to
    that level. ``keep_mask`` (1 = keep ``init_latent``) inpaints with an ordinary model: from pure noise, or
    with ``strength < 1`` from ``start_latent`` (default ``init_latent``) noised to that level.
    ``sigmas`` (descending, last = end level) overrides ``steps``/``discretization``; ``solver`` (a function
    of :mod:`solvers`' form) overrides the sampler's own, e.g. DPM-Solver++ of another order.

    Ensemble of expert denoisers (SDXL base + refiner, as diffusers' ``denoising_end`` / ``denoising_start``):
    ``denoising_end=f`` runs only the steps at training timesteps >= ``round(T - f * T)`` and returns the
    still-noisy latent; ``denoising_start=f`` with that ``noisy_latent`` runs the remaining steps of the
    same schedule (no noise is added).

    Guidance-distilled models (a UNet with ``time_cond_proj_dim``, e.g. LCM_Dreamshaper) take the guidance as an
    input, as in diffusers: ``cond`` carries the embedding of ``guidance_scale - 1`` and ``uncond`` is not used.

    ``approx``: opt-in approximate speed-ups for this run (DeepCache feature reuse, ToMe token merging; see
    :mod:`ldm.models.diffusion.sampling.approx`), removed from the UNet when the run ends.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(sampler_names())}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    spec = SAMPLERS[sampler]
    options = dict(spec.options)
    if eta is not None:
        if "eta" not in options:
            if eta != 0:
                takes = ", ".join(n for n in sampler_names() if "eta" in SAMPLERS[n].options)
                raise ValueError(f"sampler {sampler!r} {'' if spec.stochastic else 'is deterministic and '}takes no eta; "
                                 f"use one of {takes}")
        else:
            options["eta"] = float(eta)
    den = denoiser or DiscreteDenoiser(model)
    if spec.schedule:
        options["schedule"] = den
    if spec.distilled and guidance_scale <= 1:
        uncond = None  # LCM-LoRA etc. run unguided at scale 1 (or below), as in diffusers: one UNet call per step
    if guidance_input_dim(model) is not None:  # guidance-distilled (LCM) models take the scale as an input
        uncond, cond = None, with_guidance_input(model, cond, guidance_scale)
    device = execution_device(model)
    dtype = torch.float32
    if sigmas is None:
        sigmas = get_sigmas(den, discretization or spec.discretization, steps, spec.final)
    sigmas = sigmas.to(device, torch.float32)

    if x_T is None and noisy_latent is not None:
        shape = tuple(noisy_latent.shape[1:])
    if x_T is None:
        if seeds is None or shape is None:
            raise ValueError("pass either x_T or both seeds and shape")
        noise_source: Optional[NoiseSource] = NoiseSource(seeds, device, dtype)
        x_T = noise_source.randn(shape)
    else:
        x_T = x_T.to(device, dtype)
        noise_source = NoiseSource(seeds, device, dtype) if seeds is not None else None
    # Without seeds, stochastic samplers draw step noise from torch's global RNG.
    step_noise: Callable[[torch.Tensor], torch.Tensor] = noise_source or (lambda like: torch.randn_like(like))

    sigmas, start = _expert_range(den, sigmas, denoising_start, denoising_end)
    if denoising_start is not None:
        if noisy_latent is None:
            raise ValueError("denoising_start needs noisy_latent (the latent the first expert stopped at)")
        x = noisy_latent.to(device, dtype) * (1 + sigmas[0] ** 2).sqrt()
    elif init_latent is not None and (keep_mask is None or strength < 1):
        start_from = init_latent if start_latent is None else start_latent
        n = len(sigmas) - 1
        t_enc = int(strength * n)
        if t_enc == 0:
            return start_from
        sigmas = sigmas[n - t_enc:]
        x = start_from.to(device, dtype) + sigmas[0] * x_T
    else:
        x = x_T * (1 + sigmas[0] ** 2).sqrt()

    denoise = CFGDenoiser(den, cond, uncond, guidance_scale, guidance_rescale)
    if keep_mask is not None:
        if init_latent is None:
            raise ValueError("keep_mask needs init_latent (the latent of the image to keep)")
        keep = keep_mask.to(device, dtype)
        denoise = MaskedDenoiser(denoise, init_latent.to(device, dtype), keep, x_T)

    bar = tqdm(total=len(sigmas) - 1, desc=sampler, disable=not progress, leave=False)

    def on_step(i: int, x_i: torch.Tensor, x0: torch.Tensor) -> None:
        bar.update(1)
        if callback is not None:
            callback({"i": start + i, "x": x_i, "sigma": sigmas[i], "denoised": x0, "total": start + len(sigmas) - 1})

    try:
        with approximations(model, approx):
            x = (solver or spec.fn)(denoise, x, sigmas, on_step, noise=step_noise, **({} if solver else options))
    finally:
        bar.close()
    z = x / (1 + sigmas[-1] ** 2).sqrt()
    if keep_mask is not None and denoising_end is not None:  # hand-off: the kept region at the level reached
        known = (init_latent.to(device, dtype) + sigmas[-1] * x_T) / (1 + sigmas[-1] ** 2).sqrt()
        z = keep * known + (1 - keep) * z
    elif keep_mask is not None:
        z = keep * init_latent.to(device, dtype) + (1 - keep) * z
    return z


def _expert_range(den: DiscreteDenoiser, sigmas: torch.Tensor, start: Optional[float],
                  end: Optional[float]) -> tuple[torch.Tensor, int]:
    """The part of ``sigmas`` an expert runs (diffusers' rule: by training timestep against the cutoff
    ``round(T - fraction * T)``), and the index of its first step in the whole schedule."""
    for name, value in (("denoising_start", start), ("denoising_end", end)):
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if start is None and end is None:
        return sigmas, 0
    steps = den.sigma_to_t(sigmas[:-1].to(den.log_sigmas.device)).to(sigmas.device)
    first, last = 0, len(sigmas) - 1
    if end is not None:
        cutoff = round(den.num_timesteps - end * den.num_timesteps)
        last = int((steps >= cutoff).sum())
    if start is not None:
        cutoff = round(den.num_timesteps - start * den.num_timesteps)
        first = len(steps) - int((steps < cutoff).sum())
    if last <= first:
        raise ValueError(f"denoising_start/denoising_end leave no step of the {len(steps)} to run; "
                         "use more steps or another switch point")
    return sigmas[first:last + 1], first
