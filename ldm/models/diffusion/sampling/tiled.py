"""Denoise a large latent in overlapping tiles, blended in latent space at every step (MultiDiffusion-style).

At each call the latent is cut into ``tile`` x ``tile`` windows overlapping by ``overlap``; the model
predicts x0 for each window (with the matching window of any ``c_concat`` conditioning), and the
predictions are averaged with linear ramps over the overlaps. The solver always steps the whole
latent, so neighbouring tiles agree at every step and no seams form. A latent that fits in one tile
takes the plain, untiled path (bit-identical results).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ldm.models.diffusion.sampling.denoiser import DiscreteDenoiser
from ldm.models.vae_tiling import _ramp, _starts


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the windows covering a ``height`` x ``width`` latent."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiling: overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    stride = tile - overlap
    return [(top, left, min(tile, height), min(tile, width))
            for top in _starts(height, tile, stride) for left in _starts(width, tile, stride)]


def _crop_cond(cond: Any, box: tuple[int, int, int, int], size: tuple[int, int]) -> Any:
    """``cond`` with every spatial map of the latent's size cut to ``box`` (text and labels unchanged)."""
    top, left, h, w = box
    if isinstance(cond, dict):
        return {k: _crop_cond(v, box, size) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [_crop_cond(v, box, size) for v in cond]
    if isinstance(cond, torch.Tensor) and cond.dim() == 4 and tuple(cond.shape[-2:]) == size:
        return cond[..., top:top + h, left:left + w]
    return cond


class TiledDenoiser(DiscreteDenoiser):
    """A :class:`DiscreteDenoiser` that evaluates the model tile by tile (pass it to ``sample(denoiser=...)``)."""

    def __init__(self, model: nn.Module, tile: int, overlap: Optional[int] = None,
                 parameterization: Optional[str] = None):
        super().__init__(model, parameterization)
        self.tile = int(tile)
        self.overlap = self.tile // 4 if overlap is None else int(overlap)
        tile_boxes(self.tile, self.tile, self.tile, self.overlap)  # checks the pair now, not at the first step

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        boxes = tile_boxes(*size, self.tile, self.overlap)
        if len(boxes) == 1:
            return super().forward(x, sigma, cond)
        out = torch.zeros_like(x, dtype=torch.float32)
        total = torch.zeros(size, dtype=torch.float32, device=x.device)
        for box in boxes:
            top, left, h, w = box
            window = super().forward(x[..., top:top + h, left:left + w], sigma, _crop_cond(cond, box, size))
            ramp_y = _ramp(self.overlap, h, top > 0, top + h < size[0])
            ramp_x = _ramp(self.overlap, w, left > 0, left + w < size[1])
            weight = (ramp_y[:, None] * ramp_x[None, :]).to(x.device)
            out[..., top:top + h, left:left + w] += window.float() * weight
            total[top:top + h, left:left + w] += weight
        return (out / total).to(x.dtype)
