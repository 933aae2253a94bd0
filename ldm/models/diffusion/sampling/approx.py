"""Opt-in approximate accelerations for one sampling run: feature reuse (DeepCache) and token merging (ToMe).

Both are off by default. ``sample(..., approx=Approximations(deepcache_interval=3))`` patches the model's UNet
for that run only: the patches (and the feature cache) are removed when the run ends, also on errors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch import nn

from ldm.modules.diffusionmodules.feature_reuse import FeatureReuse
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.tome import TokenMerging


@dataclass(frozen=True)
class Approximations:
    deepcache_interval: Optional[int] = None  # run the whole UNet every N calls, reuse deep features between
    deepcache_depth: int = 1  # deepest input block that runs on reuse calls (0 = the input convolution)
    tome_ratio: Optional[float] = None  # fraction of tokens merged before self-attention at the top resolution
    tome_layers: str = "self_attention"  # or "attention" (+ cross-attention), "all" (+ feed-forward)
    tome_max_downsample: int = 1  # also merge this many times downsampled (1: the top resolution only)

    @classmethod
    def from_settings(cls, settings: Any) -> "Approximations":
        """The approximations a :class:`ldm.settings.SamplingSettings` asks for."""
        return cls(settings.deepcache_interval, settings.deepcache_depth, settings.tome_ratio,
                   settings.tome_layers, settings.tome_max_downsample)

    @property
    def active(self) -> bool:
        return self.deepcache_interval is not None or self.tome_ratio is not None


def find_unet(model: nn.Module) -> UNetModel:
    """The UNet of a LatentDiffusion / DiffusionEngine (``model.model.diffusion_model``)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise ValueError("deepcache_interval / tome_ratio need a model whose model.diffusion_model is ldm's UNetModel")
    if getattr(unet, "_compiled_call_impl", None) is not None:
        raise ValueError("deepcache_interval / tome_ratio do not combine with compile=true (a compiled UNet)")
    return unet


@contextlib.contextmanager
def approximations(model: nn.Module, approx: Optional[Approximations]) -> Iterator[Optional[FeatureReuse]]:
    """Apply ``approx`` to ``model``'s UNet for the duration of the block (nothing when it asks for nothing);
    yields the :class:`FeatureReuse` in force, if any (its counters tell which calls ran in full)."""
    if approx is None or not approx.active:
        yield None
        return
    unet = find_unet(model)
    with contextlib.ExitStack() as stack:
        reuse = None
        if approx.tome_ratio is not None:
            stack.enter_context(TokenMerging(unet, approx.tome_ratio, approx.tome_layers, approx.tome_max_downsample))
        if approx.deepcache_interval is not None:
            reuse = stack.enter_context(FeatureReuse(unet, approx.deepcache_interval, approx.deepcache_depth))
        yield reuse
