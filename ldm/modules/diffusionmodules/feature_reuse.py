"""Feature reuse across sampling steps (DeepCache, Ma et al. 2023): an approximate, opt-in speed-up.

Adjacent denoising steps change the UNet's deep features little. Every ``interval``-th call runs the whole
UNet and keeps the feature map that enters the output side at skip branch ``depth``; the calls in between
run only the shallow blocks (input blocks ``0..depth`` and the output blocks their skips feed) and take the
deep part from that cache.

    with FeatureReuse(unet, interval=3, depth=1):
        ...  # sample: calls 0, 3, 6, ... are full, the others shallow

Blocks are numbered as in CompVis' ``input_blocks`` (0 is the input convolution). ``depth=1`` keeps the input
convolution and the first block of the highest resolution, DeepCache's choice for Stable Diffusion. The cache
holds the whole batch the UNet saw (both halves of a CFG batch); a call whose input shape differs from the
cached one runs in full. Leaving the ``with`` block removes the patch and the cache, so each sampling run
starts afresh. A full call is the UNet's own forward, so ``interval=1`` gives bit-identical results.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel


class FeatureReuse:
    """Patches one :class:`UNetModel` instance's ``forward`` while active (a context manager)."""

    def __init__(self, unet: UNetModel, interval: int = 3, depth: int = 1):
        if not isinstance(unet, UNetModel):
            raise TypeError(f"feature reuse needs an ldm UNetModel, got {type(unet).__name__}")
        n = len(unet.input_blocks)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"deepcache_interval must be a positive integer, got {interval!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth < n:
            raise ValueError(f"deepcache_depth must be in [0, {n - 1}] for this UNet ({n} input blocks), got {depth!r}")
        self.unet, self.interval, self.depth = unet, interval, depth
        self.shallow = depth + 1  # input blocks that run on every call; as many output blocks at the end
        # The module whose output enters the shallow output blocks: the feature map that is cached.
        self.cache_source: nn.Module = unet.middle_block if self.shallow == n else unet.output_blocks[n - self.shallow - 1]
        self.calls = self.full_calls = 0
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None
        self._hook = None

    def __enter__(self) -> "FeatureReuse":
        if "forward" in vars(self.unet):
            raise RuntimeError("this UNet's forward is already replaced (feature reuse active twice?)")
        self.calls = self.full_calls = 0
        self._cache = self._cache_key = None
        self.unet.forward = self._forward  # an instance attribute: the class's forward stays untouched
        return self

    def __exit__(self, *exc: object) -> None:
        vars(self.unet).pop("forward", None)
        self._cache = self._cache_key = None

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                 y: Optional[torch.Tensor] = None, timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        key = (tuple(x.shape), None if context is None else tuple(context.shape), x.device)
        full = self.calls % self.interval == 0 or self._cache is None or key != self._cache_key
        self.calls += 1
        if full:
            return self._full(x, timesteps, context, y, timestep_cond, key)
        return self._shallow(x, timesteps, context, y, timestep_cond)

    def _full(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor],
              y: Optional[torch.Tensor], timestep_cond: Optional[torch.Tensor], key: tuple) -> torch.Tensor:
        kept: list[torch.Tensor] = []
        hook = self.cache_source.register_forward_hook(lambda _module, _args, out: kept.append(out))
        try:
            out = UNetModel.forward(self.unet, x, timesteps, context, y, timestep_cond)
        finally:
            hook.remove()
        self._cache, self._cache_key = kept[-1], key
        self.full_calls += 1
        return out

    def _shallow(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor],
                 y: Optional[torch.Tensor], timestep_cond: Optional[torch.Tensor]) -> torch.Tensor:
        unet = self.unet
        h, emb, context = unet.prepare_inputs(x, timesteps, context, y, timestep_cond)
        skips = []
        for module in unet.input_blocks[: self.shallow]:
            h = module(h, emb, context)
            skips.append(h)
        h = self._cache
        for module in unet.output_blocks[len(unet.output_blocks) - self.shallow:]:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb, context, output_size=skips[-1].shape[2:] if skips else None)
        return unet.out(h).to(x.dtype)
