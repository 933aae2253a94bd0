"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023): an approximate, opt-in speed-up.

Before the self-attention of the highest-resolution transformer blocks, the most redundant tokens are merged
(bipartite soft matching); the attention runs on fewer tokens and its output is copied back to every token
that was merged ("unmerged"). Cross-attention and the feed-forward layers see all tokens.

Matching: the tokens are split into destinations (one per 2x2 window, at a position drawn from a generator
seeded when the patch is applied, so runs are reproducible) and sources (the rest). Each source finds its
most similar destination (cosine similarity); the ``ratio * N`` sources with the most similar partners are
averaged into them.

    with TokenMerging(unet, ratio=0.5):
        ...  # sample

The patch replaces ``attn1.forward`` of the affected blocks' instances and is undone on leaving the block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample

MAX_RATIO = 0.75  # three tokens of each 2x2 window can go; the fourth is the destination
SEED = 0


def destination_mask(height: int, width: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Boolean [height * width]: one destination token per 2x2 window (random position with ``generator``,
    else the window's top-left). Rows / columns left over by odd sizes hold sources only."""
    hs, ws = height // 2, width // 2
    if generator is None:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    else:
        pick = torch.randint(4, (hs, ws), generator=generator)
    window = torch.zeros(hs, ws, 4, dtype=torch.bool).scatter_(2, pick[..., None], True)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[: 2 * hs, : 2 * ws] = window.reshape(hs, ws, 2, 2).permute(0, 2, 1, 3).reshape(2 * hs, 2 * ws)
    return mask.reshape(-1)


@dataclass
class Merge:
    """One matching of a [B, N, C] token set: which sources go into which destinations."""

    src: torch.Tensor  # [Ns] token indices of the sources
    dst: torch.Tensor  # [Nd] token indices of the destinations
    moved: torch.Tensor  # [B, r] source numbers (into ``src``) merged away
    kept: torch.Tensor  # [B, Ns - r] source numbers kept as they are
    target: torch.Tensor  # [B, r] destination numbers (into ``dst``) each moved source joins
    n: int

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: kept sources, then destinations averaged with their merged sources."""
        c = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]
        kept = src.gather(1, self.kept[..., None].expand(-1, -1, c))
        moved = src.gather(1, self.moved[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, self.target[..., None].expand(-1, -1, c), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: every token gets the output of the token it was merged into."""
        b, _, c = y.shape
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        src = y.new_empty(b, self.src.shape[0], c)
        src.scatter_(1, self.kept[..., None].expand(-1, -1, c), kept)
        src.scatter_(1, self.moved[..., None].expand(-1, -1, c), dst.gather(1, self.target[..., None].expand(-1, -1, c)))
        out = y.new_empty(b, self.n, c)
        out[:, self.src] = src
        out[:, self.dst] = dst
        return out


def bipartite_matching(metric: torch.Tensor, height: int, width: int, ratio: float,
                       generator: Optional[torch.Generator] = None) -> Optional[Merge]:
    """The :class:`Merge` of ``ratio`` of the [B, height * width, C] tokens ``metric``; None when none merge."""
    b, n, _ = metric.shape
    if n != height * width:
        raise ValueError(f"{n} tokens are not a {height}x{width} map")
    is_dst = destination_mask(height, width, generator).to(metric.device)
    src, dst = (~is_dst).nonzero().squeeze(1), is_dst.nonzero().squeeze(1)
    r = min(int(n * ratio), src.shape[0] if dst.shape[0] else 0)
    if r <= 0:
        return None
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # [B, Ns, Nd]
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    moved, kept = order[:, :r], order[:, r:]
    return Merge(src, dst, moved, kept, best_dst.gather(1, moved), n)


def transformer_resolutions(unet: UNetModel) -> list[tuple[SpatialTransformer, int]]:
    """Every spatial transformer of ``unet`` with its downsampling factor (1 = the latent's resolution)."""
    found: list[tuple[SpatialTransformer, int]] = []
    ds = 1
    for block in unet.input_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.append((layer, ds))
            if isinstance(layer, Downsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Downsample)):
                ds *= 2
    found += [(layer, ds) for layer in unet.middle_block if isinstance(layer, SpatialTransformer)]
    for block in unet.output_blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                found.append((layer, ds))
            if isinstance(layer, Upsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample)):
                ds //= 2
    return found


class TokenMerging:
    """Merges tokens before self-attention in ``unet``'s highest-resolution transformer blocks while active."""

    def __init__(self, unet: UNetModel, ratio: float = 0.5):
        if not isinstance(unet, UNetModel):
            raise TypeError(f"token merging needs an ldm UNetModel, got {type(unet).__name__}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_RATIO:
            raise ValueError(f"tome_ratio must be in [0, {MAX_RATIO}], got {ratio!r}")
        levels = transformer_resolutions(unet)
        if not levels:
            raise ValueError("tome_ratio needs a UNet with spatial transformers (use_spatial_transformer: true)")
        top = min(ds for _, ds in levels)
        self.ratio = float(ratio)
        self.transformers = [layer for layer, ds in levels if ds == top]
        self.attentions: list[CrossAttention] = [
            block.attn1 for layer in self.transformers for block in layer.transformer_blocks
            if isinstance(block, BasicTransformerBlock)
        ]
        self.generator = torch.Generator()
        self._saved: list[tuple[CrossAttention, Optional[Callable]]] = []
        self._hooks: list = []
        self._feature_hw: Optional[tuple[int, int]] = None  # of the transformer running now

    def __enter__(self) -> "TokenMerging":
        if self._saved:
            raise RuntimeError("token merging is already active")
        self.generator.manual_seed(SEED)
        # Each transformer notes its feature map's height and width for the attention layers inside it.
        self._hooks = [layer.register_forward_pre_hook(self._note_size) for layer in self.transformers]
        for attn in self.attentions:
            self._saved.append((attn, vars(attn).get("forward")))
            attn.forward = self._merged_forward(attn.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for attn, previous in reversed(self._saved):
            if previous is None:
                vars(attn).pop("forward", None)
            else:
                attn.forward = previous
        self._saved = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._feature_hw = None

    def _note_size(self, _module: nn.Module, args: tuple) -> None:
        self._feature_hw = tuple(args[0].shape[-2:])

    def _merged_forward(self, attend: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, context: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            if context is None and mask is not None:
                raise ValueError("token merging cannot apply a key mask to merged self-attention keys")
            if self._feature_hw is None:
                raise RuntimeError("token merging: the attention ran outside its spatial transformer")
            plan = bipartite_matching(x, *self._feature_hw, self.ratio, self.generator)
            if plan is None:
                return attend(x, context=context, mask=mask)
            return plan.unmerge(attend(plan.merge(x), context=context, mask=mask))
        return forward
