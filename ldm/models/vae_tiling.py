"""Decode large latents tile by tile, blending the overlaps, so peak memory follows the tile, not the image.

Each tile is ``tile`` x ``tile`` latents; neighbours overlap by ``overlap`` latents, and in the overlap
the two decodes are mixed with linear ramps (weights normalised per pixel), so there are no seams.
What tiling cannot keep is the decoder's whole-image context (its mid-block attention and group-norm
statistics see one tile at a time): images differ slightly from an untiled decode, as with every
tiled VAE.
"""
from __future__ import annotations

from typing import Callable

import torch


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(length: int, total: int, left: bool, right: bool) -> torch.Tensor:
    """1-D weights over ``total`` pixels: linear ramps of ``length`` on the sides that overlap a neighbour."""
    w = torch.ones(total)
    ramp = (torch.arange(length, dtype=torch.float32) + 0.5) / length
    if left:
        w[:length] = ramp
    if right:
        w[total - length:] = torch.minimum(w[total - length:], ramp.flip(0))
    return w


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int, tile: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """``decode`` applied to ``z`` [B, C, h, w] in overlapping tiles; returns [B, 3, h*factor, w*factor]."""
    if not 0 <= overlap < tile:
        raise ValueError(f"vae tiling: overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    stride = tile - overlap
    out = weight = None
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    for y in ys:
        for x in xs:
            piece = decode(z[:, :, y:y + tile, x:x + tile]).float()
            if out is None:
                out = torch.zeros(b, piece.shape[1], h * factor, w * factor, device=piece.device)
                weight = torch.zeros(1, 1, h * factor, w * factor, device=piece.device)
            ph, pw = piece.shape[-2:]
            ramp_len = max(1, overlap * factor)
            wy = _ramp(ramp_len, ph, y > 0, y + tile < h)
            wx = _ramp(ramp_len, pw, x > 0, x + tile < w)
            mask = (wy[:, None] * wx[None, :]).to(piece.device)
            out[:, :, y * factor:y * factor + ph, x * factor:x * factor + pw] += piece * mask
            weight[:, :, y * factor:y * factor + ph, x * factor:x * factor + pw] += mask
    return out / weight
