"""PatchGAN discriminator (pix2pix): a conv stack that scores every overlapping image patch.

Module and key names (``main.N.*``, ActNorm's ``loc``/``scale``/``initialized``) follow the
CompVis/taming layout, so CompVis autoencoder checkpoints load their ``loss.discriminator.*``.
"""
from __future__ import annotations

import torch
from torch import nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first training batch (Glow's actnorm).

    Unlike BatchNorm it keeps no running statistics, so train and eval behave the same.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.loc = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        per_channel = x.detach().transpose(0, 1).flatten(1).float()
        self.loc.copy_(-per_channel.mean(dim=1).view_as(self.loc))
        self.scale.copy_(1.0 / (per_channel.std(dim=1).view_as(self.scale) + self.eps))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """``n_layers`` stride-2 convs, then two stride-1 convs; returns logits [B, 1, h, w], one per patch.

    Inputs must be at least ``3 * 2**n_layers`` pixels on each side (16x16 images: ``n_layers=2``).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False):
        super().__init__()
        self.n_layers = n_layers

        def norm(channels: int) -> nn.Module:
            return ActNorm(channels) if use_actnorm else nn.BatchNorm2d(channels)

        bias = use_actnorm  # BatchNorm removes the mean, so a conv bias before it is redundant
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1  # the last hidden conv keeps the resolution (minus one)
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=bias), norm(out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DCGAN initialisation: small conv weights, BatchNorm scales near one.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    @property
    def min_input_size(self) -> int:
        return 3 * 2 ** self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are too small for a {self.n_layers}-layer "
                             f"discriminator (needs at least {self.min_input_size}); lower disc_num_layers")
        return self.main(x)
