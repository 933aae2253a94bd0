"""Decode (or encode) large inputs tile by tile, blending the overlaps, so peak memory follows the tile.

Each tile covers ``tile`` x ``tile`` latents (``tile * factor`` pixels when encoding); neighbours overlap
by ``overlap`` latents, and in the overlap the two results are mixed with linear ramps (weights
normalised per pixel), so there are no seams. What tiling cannot keep is the network's whole-image
context (its mid-block attention and group-norm statistics see one tile at a time): results differ
slightly from an untiled pass, as with every tiled VAE.
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def _starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(length: int, total: int, left: bool, right: bool) -> torch.Tensor:
    """1-D weights over ``total`` pixels: linear ramps of ``length`` on the sides that overlap a neighbour."""
    w = torch.ones(total)
    length = min(length, total)
    ramp = (torch.arange(length, dtype=torch.float32) + 0.5) / length
    if left:
        w[:length] = ramp
    if right:
        w[total - length:] = torch.minimum(w[total - length:], ramp.flip(0))
    return w


def _tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
           up: int = 1, down: int = 1) -> torch.Tensor:
    """``fn`` over overlapping ``tile`` x ``tile`` windows of ``x``, whose outputs are ``up / down`` times
    the window's size; the outputs are blended into one tensor of ``up / down`` times ``x``'s size."""
    if not 0 <= overlap < tile:
        raise ValueError(f"vae tiling: overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    b, _, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    stride = tile - overlap
    out = weight = None
    for y in _starts(h, tile, stride):
        for x0 in _starts(w, tile, stride):
            piece = fn(x[:, :, y:y + tile, x0:x0 + tile]).float()
            if out is None:
                out = torch.zeros(b, piece.shape[1], h * up // down, w * up // down, device=piece.device)
                weight = torch.zeros(1, 1, h * up // down, w * up // down, device=piece.device)
            ph, pw = piece.shape[-2:]
            ramp_len = max(1, overlap * up // down)
            wy = _ramp(ramp_len, ph, y > 0, y + tile < h)
            wx = _ramp(ramp_len, pw, x0 > 0, x0 + tile < w)
            mask = (wy[:, None] * wx[None, :]).to(piece.device)
            top, left = y * up // down, x0 * up // down
            out[:, :, top:top + ph, left:left + pw] += piece * mask
            weight[:, :, top:top + ph, left:left + pw] += mask
    return out / weight


def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int, tile: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """``decode`` applied to ``z`` [B, C, h, w] in overlapping tiles; returns [B, 3, h*factor, w*factor]."""
    return _tiled(decode, z, tile, overlap, up=factor)


def tiled_encode(first_stage: torch.nn.Module, image: torch.Tensor, factor: int, tile: int = 64,
                 overlap: int = 16) -> Union[DiagonalGaussianDistribution, torch.Tensor]:
    """The posterior of ``image`` [B, 3, H, W] from an AutoencoderKL, encoded in overlapping pixel tiles of
    ``tile * factor`` (``tile`` and ``overlap`` in latent pixels); the tiles' moments (mean, log-variance)
    are blended. A first stage whose ``encode`` gives a tensor (VQModelInterface: pre-quantization latents)
    gets those latents blended."""
    gaussian: list[bool] = []

    def moments(x: torch.Tensor) -> torch.Tensor:
        out = first_stage.encode(x)
        gaussian.append(isinstance(out, DiagonalGaussianDistribution))
        return out.parameters if gaussian[-1] else out

    blended = _tiled(moments, image, tile * factor, overlap * factor, down=factor)
    return DiagonalGaussianDistribution(blended) if gaussian[0] else blended
