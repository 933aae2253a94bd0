"""Cross-attention and the spatial transformer used inside the UNet.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``, which picks
flash / memory-efficient kernels where available; the math is CompVis' (softmax(QK^T/sqrt(d))V).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head attention over [B, N, heads*d] tensors; returns [B, N, heads*d].

    ``mask``: boolean [B, N_keys] (or [B, ...] flattening to N_keys), True = attend; see :func:`key_mask_bias`.
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    bias = None if mask is None else key_mask_bias(mask.to(q.device), q.shape[0], k.shape[2], q.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return rearrange(out, "b h n d -> b n (h d)")


def key_mask_bias(mask: torch.Tensor, batch: int, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive [B, N_keys] bias from a CompVis key mask: 0 where True, a huge negative finite value where
    False, so masked keys get no weight and a row with every key masked attends uniformly (CompVis'
    ``masked_fill`` behaviour) instead of producing NaN. Half the dtype's range keeps ``score + bias`` finite
    in float16 too."""
    mask = mask.reshape(mask.shape[0], -1)
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        mask = mask != 0
    if mask.shape[1] != n_keys or mask.shape[0] not in (1, batch):
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not match batch {batch} x {n_keys} keys")
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, -torch.finfo(dtype).max / 2).expand(batch, n_keys)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Attention of ``x`` over ``context`` (self-attention when context is None).

    CompVis' attributes and call: ``scale`` (dim_head ** -0.5), ``heads``, ``to_q``/``to_k``/``to_v``/``to_out``
    and ``forward(x, context=None, mask=None)``. Transformer blocks call it as a module, so code that replaces
    ``CrossAttention.forward`` (or an instance's ``forward``), e.g. prompt-to-prompt attention control, runs
    in every attention layer of the UNet.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: boolean [B, N_context] (True = attend), the same for every head and query; masked keys
        get no attention weight."""
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask)
        return self.to_out(out)


# Names the published configs and third-party code use for the same layer.
MemoryEfficientCrossAttention = CrossAttention


class BasicTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: Optional[int] = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
        attn_mode: str = "softmax",
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # With self-attention disabled, attn1 attends to the context too (SD 2 option).
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint and self.training)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, cross-attending to ``context``.

    ``use_linear`` (SD 2) projects with Linear layers after flattening instead of 1x1 convs.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim=None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
        attn_type: str = "softmax",
    ):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        elif context_dim is not None and len(context_dim) != depth:
            context_dim = [context_dim[0]] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.use_linear = use_linear
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout,
                context_dim=None if context_dim is None else context_dim[d],
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )
        proj_out = nn.Linear(inner_dim, in_channels) if use_linear else nn.Conv2d(inner_dim, in_channels, 1)
        self.proj_out = zero_module(proj_out)

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[i])
        if self.use_linear:
            x = self.proj_out(x)
        # Back in the input's memory format: for a channels_last model the view already is (no copy); for
        # an NCHW one a channels_last view would make every following convolution reorder its weights.
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-d tensor stored that way (and not also plain-contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
