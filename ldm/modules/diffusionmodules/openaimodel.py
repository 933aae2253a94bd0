"""The Stable Diffusion UNet (``UNetModel``) and its blocks, with CompVis parameter names.

Covers SD 1.x (``num_heads``), SD 2.x (``num_head_channels``, ``use_linear_in_transformer``),
inpainting (extra input channels) and class / vector conditioning (``num_classes``).
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd, checkpoint, conv_nd, linear, normalization, timestep_embedding, zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to timestep blocks and ``context`` to transformers."""

    def forward(self, x, emb, context=None, output_size=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        # output_size: the skip connection's size, so latents not divisible by 2^levels still line up.
        if output_size is not None:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        elif self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (additive or scale-shift)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels (the pre-transformer LDM attention; qkv as one 1x1 conv)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_checkpoint: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x.reshape(b, c, -1)))  # [B, 3C, N]
        heads, d = self.num_heads, c // self.num_heads
        if self.use_new_attention_order:  # [q; k; v], each split into heads
            q, k, v = (t.reshape(b, heads, d, -1) for t in qkv.chunk(3, dim=1))
        else:  # heads first, each holding its own q, k, v
            q, k, v = qkv.reshape(b, heads, 3 * d, -1).chunk(3, dim=2)
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))  # [B, heads, N, d]
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (x.reshape(b, c, -1) + self.proj_out(h)).reshape(b, c, *spatial)


def _per_level(value, n_levels: int, name: str) -> list:
    if isinstance(value, int):
        return [value] * n_levels
    value = list(value)
    if len(value) != n_levels:
        raise ValueError(f"{name} has {len(value)} entries but channel_mult has {n_levels} levels; give one per level")
    return value


class GuidanceInput(nn.Module):
    """The guidance-scale input of guidance-distilled UNets (LCM models, diffusers' ``time_cond_proj_dim``): the
    embedding of ``w = scale - 1`` (``util.guidance_scale_embedding``) projected, without bias, onto the
    sinusoidal timestep embedding before ``time_embed``. The UNet holds it as ``time_embedding`` so that its
    weight's key is ``time_embedding.cond_proj.weight``, the name diffusers' UNet gives it and that files
    converted from diffusers folders carry."""

    def __init__(self, dim: int, channels: int):
        super().__init__()
        self.cond_proj = nn.Linear(dim, channels, bias=False)

    def forward(self, timestep_cond: torch.Tensor) -> torch.Tensor:
        return self.cond_proj(timestep_cond)


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding (CompVis signature)."""

    def __init__(
        self,
        image_size=None,  # recorded only (sgm configs leave it out): any multiple-of-8 size runs
        in_channels: int = 4,
        model_channels: int = 320,
        out_channels: int = 4,
        num_res_blocks: Union[int, Sequence[int]] = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes=None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim=None,
        n_embed=None,
        legacy: bool = True,
        disable_self_attentions=None,
        num_attention_blocks=None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: Optional[int] = None,
        transformer_depth_middle: Optional[int] = None,
        spatial_transformer_attn_type: str = "softmax",
        time_cond_proj_dim: Optional[int] = None,
    ):
        super().__init__()
        # sgm configs choose an attention kernel by name; every one of them is softmax attention, which
        # runs here through torch's scaled_dot_product_attention (flash / memory-efficient on GPUs).
        if spatial_transformer_attn_type not in ("softmax", "softmax-xformers"):
            raise ValueError(f"spatial_transformer_attn_type {spatial_transformer_attn_type!r} unknown; "
                             "use softmax or softmax-xformers")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the text embedding width)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if n_embed is not None:
            raise NotImplementedError("n_embed (codebook prediction) is not supported")
        if context_dim is not None and not isinstance(context_dim, int):
            context_dim = list(context_dim)
            context_dim = context_dim[0] if len(set(context_dim)) == 1 else context_dim
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = _per_level(num_res_blocks, len(channel_mult), "num_res_blocks")
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = list(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        # use_fp16/use_bf16 are accepted for config compatibility; precision follows the
        # parameters' dtype (and autocast), so they only record intent.
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        depth = _per_level(transformer_depth, len(channel_mult), "transformer_depth")
        depth_middle = depth[-1] if transformer_depth_middle is None else transformer_depth_middle
        disabled_sa = disable_self_attentions or [False] * len(channel_mult)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        def heads_for(ch: int, level_heads: int) -> tuple[int, int]:
            if num_head_channels == -1:
                n, d = level_heads, ch // level_heads
            else:
                n, d = ch // num_head_channels, num_head_channels
            if legacy:
                d = ch // n if use_spatial_transformer else num_head_channels
            return n, d

        def attn_layer(ch: int, level: int, level_heads: int, n_depth: int, disable_sa: bool) -> nn.Module:
            n, d = heads_for(ch, level_heads)
            if not use_spatial_transformer:
                return AttentionBlock(ch, n, num_head_channels, use_checkpoint, use_new_attention_order)
            return SpatialTransformer(ch, n, d, depth=n_depth, context_dim=context_dim, disable_self_attn=disable_sa,
                                      use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint)

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))
        self.time_cond_proj_dim = time_cond_proj_dim
        if time_cond_proj_dim is not None:
            if isinstance(time_cond_proj_dim, bool) or not isinstance(time_cond_proj_dim, int) or time_cond_proj_dim < 4:
                raise ValueError(f"time_cond_proj_dim must be an integer >= 4 (LCM models: 256), got {time_cond_proj_dim!r}")
            self.time_embedding = GuidanceInput(time_cond_proj_dim, model_channels)
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError("num_classes='sequential' needs adm_in_channels (the vector input width)")
                self.label_emb = nn.Sequential(nn.Sequential(
                    linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)))
            else:
                raise ValueError(f"num_classes={num_classes!r}: use an int, 'continuous' or 'sequential'")

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions and (num_attention_blocks is None or nr < num_attention_blocks[level]):
                    layers.append(attn_layer(ch, level, num_heads, depth[level], disabled_sa[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        middle: list[nn.Module] = [res(ch, ch)]
        if depth_middle >= 0:  # SDXL-style configs may drop the middle transformer with -1
            middle.append(attn_layer(ch, len(channel_mult) - 1, num_heads, depth_middle, disable_middle_self_attn))
            middle.append(res(ch, ch))
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions and (num_attention_blocks is None or i < num_attention_blocks[level]):
                    layers.append(attn_layer(ch, level, num_heads_upsample, depth[level], disabled_sa[level]))
                if level and i == self.num_res_blocks[level]:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, timestep_cond: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """Predict eps / v / x0 (per the model's training) for ``x`` at ``timesteps``. ``timestep_cond``
        [B, time_cond_proj_dim]: the guidance embedding of a guidance-distilled model (see :class:`GuidanceInput`)."""
        h, emb, context = self.prepare_inputs(x, timesteps, context, y, timestep_cond)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = module(h, emb, context, output_size=skips[-1].shape[2:] if skips else None)
        return self.out(h).to(x.dtype)

    def prepare_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                       y: Optional[torch.Tensor] = None, timestep_cond: Optional[torch.Tensor] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """What the blocks take: ``x`` and ``context`` in the weights' dtype, and the timestep (+ guidance, + label)
        embedding."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels / vector) exactly when the model was built with num_classes")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(dtype)
        if timestep_cond is not None:
            if self.time_cond_proj_dim is None:
                raise ValueError("timestep_cond given, but this UNet takes no guidance embedding (time_cond_proj_dim)")
            if tuple(timestep_cond.shape) != (x.shape[0], self.time_cond_proj_dim):
                raise ValueError(f"timestep_cond has shape {tuple(timestep_cond.shape)}; this UNet needs "
                                 f"({x.shape[0]}, {self.time_cond_proj_dim})")
            t_emb = t_emb + self.time_embedding(timestep_cond.to(x.device, dtype))
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]} but x has {x.shape[0]}")
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        if context is not None:
            context = context.to(dtype)
        return x.to(dtype), emb, context
