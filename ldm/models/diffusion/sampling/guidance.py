"""Classifier-free guidance and inpainting masks as denoiser wrappers.

``CFGDenoiser`` evaluates the unconditional (or negative-prompt) and conditional branches in one
batched forward pass. Guidance is linear in the prediction, so doing it on x0 equals doing it on
eps or v as CompVis and diffusers do.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ldm.modules.diffusionmodules.util import guidance_scale_embedding

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def _cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch (tensors, lists of tensors, or dicts of either)."""
    if isinstance(a, dict):
        if set(a) != set(b):
            raise ValueError(f"conditional and unconditional inputs have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [_cat_cond(x, y) for x, y in zip(a, b)]
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"negative/unconditional conditioning has shape {tuple(a.shape)} but the prompt's is {tuple(b.shape)}; "
            "encode both with the same number of 77-token chunks"
        )
    return torch.cat([a, b])


def rescale_guidance(guided: torch.Tensor, cond_pred: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. (2024): match the guided prediction's std to the conditional one's, blended by ``rescale``."""
    dims = list(range(1, guided.dim()))
    factor = cond_pred.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return rescale * guided * factor + (1 - rescale) * guided


def guidance_input_dim(model: Any) -> Optional[int]:
    """The guidance-embedding width of a guidance-distilled model's UNet (LCM models: 256); None for others."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    return getattr(unet, "time_cond_proj_dim", None)


def _batch_of(cond: Any) -> torch.Tensor:
    if isinstance(cond, dict):
        return _batch_of(next(v for v in cond.values() if v is not None))
    if isinstance(cond, (list, tuple)):
        return _batch_of(cond[0])
    return cond


def with_guidance_input(model: Any, cond: Any, scale: float) -> Any:
    """``cond`` carrying the embedding of ``w = scale - 1`` (``timestep_cond``) for a guidance-distilled model, as
    diffusers' pipelines do: such a model is guided by that input, in one UNet call per step, instead of by CFG.
    A bare tensor / list becomes LatentDiffusion's dict form (the key ``apply_model`` would choose)."""
    dim = guidance_input_dim(model)
    if dim is None:
        return cond
    like = _batch_of(cond)
    w = torch.full((like.shape[0],), float(scale) - 1.0, device=like.device)
    embedding = guidance_scale_embedding(w, dim)
    if isinstance(cond, dict):
        return {**cond, "timestep_cond": embedding}
    key = "c_concat" if getattr(model.model, "conditioning_key", None) == "concat" else "c_crossattn"
    return {key: list(cond) if isinstance(cond, (list, tuple)) else [cond], "timestep_cond": embedding}


class CFGDenoiser:
    """x0 = D(x, s, uncond) + scale * (D(x, s, cond) - D(x, s, uncond)), one batched call."""

    def __init__(self, denoiser: Denoiser, cond: Any, uncond: Any = None, scale: float = 1.0, rescale: float = 0.0):
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.scale, self.rescale = float(scale), float(rescale)
        self.guided = uncond is not None and self.scale != 1.0
        self.cond_in = _cat_cond(uncond, cond) if self.guided else None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        if not self.guided:
            return self.denoiser(x, sigma, self.cond)
        out_uncond, out_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), self.cond_in).chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            # Rescale in eps space (the x0 offset from x), where the prediction's std is meaningful.
            s = sigma.reshape(-1, *([1] * (x.dim() - 1))).clamp_min(1e-8)
            eps_guided, eps_cond = (x - guided) / s, (x - out_cond) / s
            guided = x - s * rescale_guidance(eps_guided, eps_cond, self.rescale)
        return guided


class MaskedDenoiser:
    """Latent inpainting for ordinary models: where ``keep`` is 1 the known latent ``x0`` is imposed.

    The network sees the known region noised to the current level (fixed noise, so ODE samplers stay
    deterministic) and the prediction there is replaced by ``x0``, so samples converge to it.
    """

    def __init__(self, denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                 keep: torch.Tensor, noise: torch.Tensor):
        self.denoiser, self.x0, self.keep, self.noise = denoiser, x0, keep, noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        known = self.x0 + s * self.noise
        x_in = self.keep * known + (1 - self.keep) * x
        return self.keep * self.x0 + (1 - self.keep) * self.denoiser(x_in, sigma)
