"""The ViT-Hybrid encoder of MiDaS' DPT-Hybrid: a ResNet-50 (v2 layout, non-pre-activation) stem and three
stages, whose stride-16 features become the tokens of a ViT-Base.

Parameter names are timm's ``vit_base_r50_s16_384`` (``patch_embed.backbone.stem.conv``,
``patch_embed.backbone.stages.N.blocks.M.conv1``, ``blocks.N.attn.qkv``, ...), the names the MiDaS file
``dpt_hybrid-midas-501f0c75.pt`` and SD 2's depth checkpoint store under ``pretrained.model.``. Written here
rather than built by timm: timm is not a dependency of this package, its hybrid-ViT internals moved between
releases, and the tiny test models need other depths and widths. Numerics follow the original (JAX) weights
as timm and transformers run them: weight-standardised convolutions (eps 1e-8) with TensorFlow "same" padding,
GroupNorm(32) + ReLU, LayerNorm eps 1e-6, exact GELU.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's "SAME" padding: the output has ceil(size / stride) pixels, the extra pad on the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """A convolution whose weights are standardised (zero mean, unit variance per output channel) at every call,
    with "SAME" padding (BiT / ViT-Hybrid); no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, eps: float = 1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, then ReLU unless ``act`` is False."""

    def __init__(self, channels: int, groups: int, act: bool = True):
        super().__init__(groups, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 standardised conv (strided) + GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def _round_channels(value: float, divisor: int = 8) -> int:
    """A bottleneck's width: the nearest multiple of 8 (at least 8, never 10% below), as timm and BiT round it
    (64, 128, 256 at full size)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 strided, 1x1 at 4x width) with normalisation after each convolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        mid = _round_channels(out_channels / 4)
        self.downsample = (DownsampleConv(in_channels, out_channels, stride, groups)
                           if stride != 1 or in_channels != out_channels else None)
        self.conv1 = StdConv2dSame(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid, groups)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid, groups)
        self.conv3 = StdConv2dSame(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.norm1(self.conv1(x))
        y = self.norm2(self.conv2(y))
        y = self.norm3(self.conv3(y))
        return F.relu(y + shortcut)


class Stage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(in_channels if i == 0 else out_channels, out_channels,
                                                 stride if i == 0 else 1, groups) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Stem(nn.Module):
    """7x7 stride-2 standardised conv, GroupNorm + ReLU, 3x3 stride-2 max pool ("SAME"): stride 4."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.conv = StdConv2dSame(3, channels, 7, stride=2)
        self.norm = GroupNormAct(channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class ResNetBackbone(nn.Module):
    """Stem (stride 4) and stages at strides 4, 8, 16 (ResNet-50's first three: depths 3, 4, 9)."""

    def __init__(self, stem_channels: int, channels: Sequence[int], depths: Sequence[int], groups: int):
        super().__init__()
        self.stem = Stem(stem_channels, groups)
        ins = [stem_channels, *channels[:-1]]
        self.stages = nn.Sequential(*[Stage(i, o, d, 1 if n == 0 else 2, groups)
                                      for n, (i, o, d) in enumerate(zip(ins, channels, depths))])


class HybridEmbed(nn.Module):
    """The backbone's last features, projected to the token width by a 1x1 convolution."""

    def __init__(self, backbone: ResNetBackbone, in_channels: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """R50 + ViT-B/16 at 384 px (``vit_base_r50_s16_384``) by default.

    ``forward`` returns what DPT reads: the backbone's stage-1 and stage-2 feature maps (strides 4 and 8) and the
    tokens (class token first) after the blocks numbered ``hooks``. The final ``norm`` and the ImageNet ``head``
    exist only because the published weights have them; DPT never uses their output.
    """

    patch_size = 16  # the backbone's total stride: one token per 16x16 pixels

    def __init__(self, image_size: int = 384, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, stem_channels: int = 64, backbone_channels: Sequence[int] = (256, 512, 1024),
                 backbone_depths: Sequence[int] = (3, 4, 9), norm_groups: int = 32, hooks: Sequence[int] = (8, 11),
                 num_classes: int = 1000):
        super().__init__()
        if len(backbone_channels) != 3 or len(backbone_depths) != 3:
            raise ValueError("the hybrid backbone has three ResNet stages: give three backbone_channels and depths")
        if len(hooks) != 2 or not 0 <= hooks[0] < hooks[1] < depth:
            raise ValueError(f"hooks must name two of the {depth} transformer blocks in order, got {list(hooks)}")
        self.hooks = tuple(int(h) for h in hooks)
        grid = image_size // self.patch_size
        backbone = ResNetBackbone(stem_channels, backbone_channels, backbone_depths, norm_groups)
        self.patch_embed = HybridEmbed(backbone, backbone_channels[-1], embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, embed_dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The class token's embedding and the square grid's, resized (bilinear) to ``grid_h`` x ``grid_w``."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        side = math.isqrt(grid_pos.shape[0])
        grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone = self.patch_embed.backbone
        features = [backbone.stem(x)]
        for stage in backbone.stages:
            features.append(stage(features[-1]))
        tokens = self.patch_embed.proj(features[-1]).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        hooked = []
        for i, block in enumerate(self.blocks[: self.hooks[-1] + 1]):
            tokens = block(tokens)
            if i in self.hooks:
                hooked.append(tokens)
        return features[1], features[2], hooked[0], hooked[1]
