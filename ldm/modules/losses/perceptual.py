"""LPIPS perceptual distance (Zhang et al., 2018) over VGG16 features, built from local files only.

Nothing is downloaded. The VGG16 weights come from a file the user names (torchvision's
``vgg16-397923af.pth`` layout: ``features.N.weight`` / ``features.N.bias``); the learned
per-channel weights of LPIPS ("lin" layers, a few KiB) ship inside the ``lpips`` package.
Module names follow the lpips/CompVis layout (``scaling_layer``, ``net.sliceK.N``,
``linK.model.1``), so CompVis checkpoints with ``loss.perceptual_loss.*`` keys fit.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import CheckpointError, read_state_dict

PathLike = Union[str, os.PathLike]

# VGG16 ("configuration D") up to relu5_3: conv widths, "M" = 2x2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# torchvision ``features`` index ranges ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)
# Inputs come in [-1, 1]; VGG expects ImageNet-normalised pixels: (x01 - mean) / std with x01 = (x + 1) / 2.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENABLE_HINT = ("set lossconfig.params.perceptual_weights to torchvision's VGG16 weights file "
               "(vgg16-397923af.pth; nothing is downloaded)")
NO_PERCEPTUAL_HINT = "or set perceptual_weight: 0 to train without the perceptual term"


class ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([2 * m - 1 for m in IMAGENET_MEAN]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([2 * s for s in IMAGENET_STD]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """VGG16's conv trunk cut into five blocks; each child keeps its torchvision ``features`` index."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        for k, (start, end) in enumerate(SLICES, 1):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), layers[index])
            setattr(self, f"slice{k}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            features.append(x)
        return features

    def load_torchvision(self, state: dict[str, torch.Tensor], source: PathLike) -> None:
        """Copy torchvision VGG16 weights (``features.N.*``, or bare ``N.*``) into the slices."""
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
        ours = {}
        for key, own in self.state_dict().items():  # e.g. "slice2.5.weight" <- "5.weight"
            name = key.split(".", 1)[1]
            theirs = features.get(name)
            if theirs is None or theirs.shape != own.shape:
                found = "missing" if theirs is None else f"shape {tuple(theirs.shape)}, expected {tuple(own.shape)}"
                raise CheckpointError(f"perceptual_weights: {source} is not torchvision's VGG16 state dict "
                                      f"(features.{name}: {found}); {ENABLE_HINT}, {NO_PERCEPTUAL_HINT}")
            ours[key] = theirs
        self.load_state_dict(ours)


class ChannelWeights(nn.Module):
    """LPIPS' learned non-negative weight per feature channel, as a 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        # Index 1 keeps the lpips/CompVis key ``model.1.weight`` (their index 0 is a dropout layer).
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def lpips_linear_weights() -> dict[str, torch.Tensor]:
    """LPIPS' VGG channel weights (``linK.model.1.weight``), shipped inside the ``lpips`` package.

    The package is located, not imported: only its weights file is read.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the perceptual loss takes LPIPS' channel weights from the lpips package, which "
                                  "is not installed: pip install lpips (or set perceptual_weight: 0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    lin = {k: v for k, v in read_state_dict(path).items() if k.startswith("lin")}
    if sorted(lin) != [f"lin{i}.model.1.weight" for i in range(len(CHANNELS))]:
        raise CheckpointError(f"{path} does not hold LPIPS' five VGG channel weights; reinstall lpips")
    return lin


def read_vgg16_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of the user's VGG16 file (``weights_only`` pickle or safetensors), with errors that say the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"perceptual_weights: {p} not found; {ENABLE_HINT}, {NO_PERCEPTUAL_HINT}")
    try:
        return read_state_dict(p)
    except CheckpointError as err:
        raise CheckpointError(f"perceptual_weights: {err}; {ENABLE_HINT}, {NO_PERCEPTUAL_HINT}") from None


class LPIPS(nn.Module):
    """Perceptual distance per image, [B, 1, 1, 1], between images in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, vgg_weights: PathLike):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, channels in enumerate(CHANNELS):
            setattr(self, f"lin{i}", ChannelWeights(channels))
        # Built on the meta device (ldm.checkpoint.empty_init), the weights come from the checkpoint
        # loaded next: the files are not needed, e.g. to sample from an export on another machine.
        if not self.net.slice1[0].weight.is_meta:
            self.net.load_torchvision(read_vgg16_weights(vgg_weights), vgg_weights)
            self.load_state_dict(lpips_linear_weights(), strict=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a fixed metric: the training loop must not switch it

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = self.net(self.scaling_layer(torch.cat([x, y])))  # one pass through VGG for both images
        distance = x.new_zeros(x.shape[0], 1, 1, 1)
        for i, features in enumerate(both):
            fx, fy = F.normalize(features, dim=1, eps=1e-10).chunk(2)
            per_pixel = getattr(self, f"lin{i}")((fx - fy).square())
            distance = distance + per_pixel.mean(dim=(2, 3), keepdim=True)
        return distance
