"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023): an approximate, opt-in speed-up.

Before the self-attention of the highest-resolution transformer blocks, the most redundant tokens are merged
(bipartite soft matching); the attention runs on fewer tokens and its output is copied back to every token
that was merged ("unmerged"). The residual stream always keeps every token.

How far merging reaches (tomesd's ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` and ``max_downsample``):
``layers="self_attention"`` (default) merges for the self-attention only; ``"attention"`` for the
cross-attention too; ``"all"`` for the feed-forward layer as well, one matching per block shared by its three
sub-layers. ``max_downsample=2`` (4, 8) also merges in the transformers one (two, three) levels down.

Matching: the tokens are split into destinations (one per 2x2 window, at a position drawn from a generator
seeded when the patch is applied, so runs are reproducible) and sources (the rest). Each source finds its
most similar destination (cosine similarity of the self-attention's input); the ``ratio * N`` sources with
the most similar partners are averaged into them.

    with TokenMerging(unet, ratio=0.5, layers="all"):
        ...  # sample

The patch replaces ``forward`` of the affected sub-layers' instances and is undone on leaving the block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample

MAX_RATIO = 0.75  # three tokens of each 2x2 window can go; the fourth is the destination
SEED = 0
# What each ``layers`` value merges for, in the order a transformer block runs them.
LAYERS = {"self_attention": ("attn1",), "attention": ("attn1", "attn2"), "all": ("attn1", "attn2", "ff")}
MAX_DOWNSAMPLES = (1, 2, 4, 8)


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


class Merge:
    """One matching of a [B, N, C] token set, as row indices into the flattened [B * N, C] tokens.

    ``src`` / ``dst``: token indices of the sources and destinations; per batch element, ``moved`` [B, r] and
    ``kept`` [B, Ns - r] number the sources merged away and kept, ``target`` [B, r] the destination (into
    ``dst``) each moved source joins. Merged order: the kept sources, then the destinations.
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, moved: torch.Tensor, kept: torch.Tensor,
                 target: torch.Tensor, n: int):
        b, n_kept = kept.shape
        self.n, self.size = n, n_kept + dst.shape[0]  # tokens before and after merging
        base = torch.arange(b, device=src.device)[:, None]
        # Rows of the flattened input that become the merged rows, in order; rows added into them.
        self.rows = (torch.cat([src[kept], dst.expand(b, -1)], dim=1) + base * n).flatten()
        self.moved_rows = (src[moved] + base * n).flatten()
        self.target_rows = (n_kept + target + base * self.size).flatten()
        counts = torch.ones(b * self.size, device=src.device).index_add_(
            0, self.target_rows, torch.ones(self.moved_rows.shape[0], device=src.device))
        self.counts = counts[:, None]
        # For each input row, the merged row whose value it gets back.
        self.inverse = torch.empty(b * n, dtype=torch.long, device=src.device)
        self.inverse[self.rows] = torch.arange(b * self.size, device=src.device)
        self.inverse[self.moved_rows] = self.target_rows

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: kept sources, then destinations averaged with their merged sources."""
        b, n, c = x.shape
        flat = x.reshape(b * n, c)
        out = flat.index_select(0, self.rows)
        out.index_add_(0, self.target_rows, flat.index_select(0, self.moved_rows))
        return out.div_(self.counts.to(out.dtype)).view(b, self.size, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: every token gets the output of the token it was merged into."""
        b, _, c = y.shape
        return y.reshape(b * self.size, c).index_select(0, self.inverse).view(b, self.n, c)


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
    """Merges tokens for the chosen sub-layers of ``unet``'s transformer blocks (the highest-resolution ones
    unless ``max_downsample`` > 1) while active."""

    def __init__(self, unet: UNetModel, ratio: float = 0.5, layers: str = "self_attention", max_downsample: int = 1):
        if not isinstance(unet, UNetModel):
            raise TypeError(f"token merging needs an ldm UNetModel, got {type(unet).__name__}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_RATIO:
            raise ValueError(f"tome_ratio must be in [0, {MAX_RATIO}], got {ratio!r}")
        if layers not in LAYERS:
            raise ValueError(f"tome_layers must be one of {', '.join(LAYERS)}, got {layers!r}")
        if max_downsample not in MAX_DOWNSAMPLES or isinstance(max_downsample, bool):
            raise ValueError(f"tome_max_downsample must be one of {', '.join(map(str, MAX_DOWNSAMPLES))}, "
                             f"got {max_downsample!r}")
        levels = transformer_resolutions(unet)
        if not levels:
            raise ValueError("tome_ratio needs a UNet with spatial transformers (use_spatial_transformer: true)")
        top = min(ds for _, ds in levels)
        self.ratio = float(ratio)
        self.layers = LAYERS[layers]
        self.transformers = [layer for layer, ds in levels if ds <= top * max_downsample]
        self.blocks = [block for layer in self.transformers for block in layer.transformer_blocks
                       if isinstance(block, BasicTransformerBlock)]
        self.attentions: list[CrossAttention] = [block.attn1 for block in self.blocks]
        self.generator = torch.Generator()
        self._saved: list[tuple[nn.Module, Optional[Callable]]] = []
        self._hooks: list = []
        self._feature_hw: Optional[tuple[int, int]] = None  # of the transformer running now
        self._plan: Optional[Merge] = None  # the matching of the block running now (made by its self-attention)

    def __enter__(self) -> "TokenMerging":
        if self._saved:
            raise RuntimeError("token merging is already active")
        self.generator.manual_seed(SEED)
        # Each transformer notes its feature map's height and width for the attention layers inside it.
        self._hooks = [layer.register_forward_pre_hook(self._note_size) for layer in self.transformers]
        for block in self.blocks:
            for name in self.layers:
                module = getattr(block, name)
                self._saved.append((module, vars(module).get("forward")))
                wrap = self._matching_forward if name == "attn1" else self._merged_forward
                module.forward = wrap(module.forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, previous in reversed(self._saved):
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous
        self._saved = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._feature_hw = None
        self._plan = None

    def _note_size(self, _module: nn.Module, args: tuple) -> None:
        self._feature_hw = tuple(args[0].shape[-2:])

    def _matching_forward(self, attend: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The self-attention: matches its input's tokens (for the block's later merged sub-layers too)."""
        def forward(x: torch.Tensor, context: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
            if context is None and mask is not None:
                raise ValueError("token merging cannot apply a key mask to merged self-attention keys")
            if self._feature_hw is None:
                raise RuntimeError("token merging: the attention ran outside its spatial transformer")
            plan = self._plan = bipartite_matching(x, *self._feature_hw, self.ratio, self.generator)
            if plan is None:
                return attend(x, context=context, mask=mask)
            return plan.unmerge(attend(plan.merge(x), context=context, mask=mask))
        return forward

    def _merged_forward(self, run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Cross-attention or feed-forward: runs on the tokens its block's self-attention merged.
        (A cross-attention mask masks the context's keys, which merging leaves alone.)"""
        def forward(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            plan = self._plan
            if plan is None:
                return run(x, *args, **kwargs)
            if plan.n != x.shape[1]:
                raise RuntimeError("token merging: a merged layer ran outside the block its self-attention matched")
            return plan.unmerge(run(plan.merge(x), *args, **kwargs))
        return forward
