"""DPT (Ranftl et al., "Vision Transformers for Dense Prediction") with the ViT-Hybrid encoder: MiDaS v3's
``dpt_hybrid`` relative depth network, as SD 2's depth-to-image model embeds it.

    pretrained.model            the R50 + ViT-B/16 encoder (:mod:`.backbone`)
    pretrained.act_postprocess3 tokens of block 8 -> feature map (readout projection, 1x1 conv)
    pretrained.act_postprocess4 tokens of block 11 -> feature map at half resolution (+ 3x3 stride-2 conv)
    scratch.layerN_rn           3x3 convs bringing the four feature maps (strides 4, 8, 16, 32) to ``features``
    scratch.refinenetN          fusion blocks, coarse to fine, each doubling the resolution
    scratch.output_conv         the head: conv, 2x upsampling, conv, ReLU, 1x1 conv, ReLU (depth >= 0)

The stride-4 and stride-8 maps come straight from the ResNet stages (MiDaS' ``act_postprocess1/2`` are
identities without weights, so they do not exist here). Key names are those of MiDaS'
``dpt_hybrid-midas-501f0c75.pt``. The output is relative inverse depth (larger = nearer) at the input's size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.backbone import HybridViT


class ProjectReadout(nn.Module):
    """Folds the class (readout) token into every patch token: concatenate, then Linear + GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        readout = tokens[:, :1].expand(-1, tokens.shape[1] - 1, -1)
        return self.project(torch.cat([tokens[:, 1:], readout], dim=-1))


class Reassemble(nn.Sequential):
    """Tokens -> feature map. Positions 1 and 2 are MiDaS' transpose and unflatten steps (no weights; kept so
    the convolutions sit at indices 3 and 4 as in the published files); ``downsample`` adds a stride-2 conv."""

    def __init__(self, dim: int, out_channels: int, downsample: bool):
        layers = [ProjectReadout(dim), nn.Identity(), nn.Identity(), nn.Conv2d(dim, out_channels, kernel_size=1)]
        if downsample:
            layers.append(nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        x = self[0](tokens)
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class HybridEncoder(nn.Module):
    """The encoder and its reassembly: four feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, vit: HybridViT):
        super().__init__()
        dim = vit.pos_embed.shape[-1]
        self.model = vit
        self.act_postprocess3 = Reassemble(dim, dim, downsample=False)
        self.act_postprocess4 = Reassemble(dim, dim, downsample=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layer1, layer2, tokens3, tokens4 = self.model(x)
        grid = (x.shape[-2] // self.model.patch_size, x.shape[-1] // self.model.patch_size)
        return layer1, layer2, self.act_postprocess3(tokens3, grid), self.act_postprocess4(tokens4, grid)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x))))."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Adds the refined skip features (if any) to the coarser path, refines, doubles the size, projects."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)  # noqa: N815 (MiDaS' key names)
        self.resConfUnit2 = ResidualConvUnit(features)  # noqa: N815

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)


class Scratch(nn.Module):
    """Everything after the encoder: channel reduction, fusion, head."""

    def __init__(self, in_channels: Sequence[int], features: int):
        super().__init__()
        for i, channels in enumerate(in_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(features))
        self.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1), Interpolate(2),
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=1), nn.ReLU(), nn.Identity())

    def forward(self, layers: Sequence[torch.Tensor]) -> torch.Tensor:
        l1, l2, l3, l4 = (getattr(self, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1))
        path = self.refinenet4(l4)
        path = self.refinenet3(path, l3)
        path = self.refinenet2(path, l2)
        path = self.refinenet1(path, l1)
        return self.output_conv(path)


class DPTDepthModel(nn.Module):
    """DPT-Hybrid depth: ``[B, 3, H, W]`` (H, W multiples of 32, normalised to [-1, 1]) -> ``[B, H, W]`` relative
    inverse depth. The defaults are MiDaS v3 ``dpt_hybrid``; smaller values build tiny test models with the same
    key structure."""

    def __init__(self, features: int = 256, image_size: int = 384, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, stem_channels: int = 64,
                 backbone_channels: Sequence[int] = (256, 512, 1024), backbone_depths: Sequence[int] = (3, 4, 9),
                 norm_groups: int = 32, hooks: Sequence[int] = (8, 11), num_classes: int = 1000):
        super().__init__()
        vit = HybridViT(image_size=image_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                        mlp_ratio=mlp_ratio, stem_channels=stem_channels, backbone_channels=backbone_channels,
                        backbone_depths=backbone_depths, norm_groups=norm_groups, hooks=hooks,
                        num_classes=num_classes)
        self.pretrained = HybridEncoder(vit)
        self.scratch = Scratch([backbone_channels[0], backbone_channels[1], embed_dim, embed_dim], features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"DPT needs an input whose sides are multiples of 32, got {x.shape[-1]}x{x.shape[-2]}")
        return self.scratch(self.pretrained(x)).squeeze(1)
