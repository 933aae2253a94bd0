"""``VQLPIPSWithDiscriminator``: the VQGAN first-stage objective (taming / CompVis ``vqperceptual``).

Autoencoder ("generator") side, for images x, reconstructions r and the quantizer's loss q:

    rec  = pixelloss_weight * pixel(x, r) + perceptual_weight * LPIPS(x, r)    (pixel: |x - r| or (x - r)^2)
    nll  = mean(rec)
    g    = -mean(D(r))
    loss = nll + d_weight * disc_factor * g + codebook_weight * mean(q)

with the same adaptive ``d_weight`` and ``disc_start`` schedule as the KL objective
(:mod:`ldm.modules.losses.contperceptual`); the discriminator side is identical too.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ldm.modules.losses.contperceptual import DISC_LOSSES, adaptive_weight
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.perceptual import ENABLE_HINT, LPIPS
from ldm.modules.vqvae.quantize import codebook_perplexity

PIXEL_LOSSES = {"l1": lambda x, y: (x - y).abs(), "l2": lambda x, y: (x - y).square()}


class VQLPIPSWithDiscriminator(nn.Module):
    """Pixel + LPIPS reconstruction, codebook loss and PatchGAN loss; the CompVis constructor, plus:

    * ``perceptual_weights``: torchvision's VGG16 weights file. Without it the perceptual term is off
      (with a warning), so published configs train offline as they are.
    * ``pixelloss_weight`` scales the pixel term (taming accepts it but ignores it; the default 1 matches).
    * ``n_classes``: the codebook size; when set, the codebook perplexity and the number of codes used
      are logged from the predicted indices.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        n_classes: Optional[int] = None,
        perceptual_loss: str = "lpips",
        pixel_loss: str = "l1",
        perceptual_weights: Optional[str] = None,
    ):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(DISC_LOSSES)}, got {disc_loss!r}")
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss {perceptual_loss!r} is not available; use 'lpips' "
                             "(or perceptual_weight: 0)")
        self.disc_start = int(disc_start)
        self.codebook_weight = float(codebook_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        self.n_classes = n_classes
        self.perceptual_loss: Optional[LPIPS] = None
        if perceptual_weight > 0 and perceptual_weights:
            self.perceptual_loss = LPIPS(perceptual_weights)
        elif perceptual_weight > 0:
            warnings.warn(f"VQLPIPSWithDiscriminator: perceptual_weight={perceptual_weight} but no perceptual_weights "
                          f"file, so the perceptual (LPIPS) term is off; to enable it, {ENABLE_HINT}; "
                          "perceptual_weight: 0 silences this warning", UserWarning, stacklevel=2)
        self.perceptual_weight = float(perceptual_weight) if self.perceptual_loss is not None else 0.0
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.disc_conditional = disc_conditional
        self.disc_loss = DISC_LOSSES[disc_loss]

    def disc_factor_at(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def _disc_input(self, images: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.disc_conditional:
            return images
        if cond is None:
            raise ValueError("disc_conditional: true needs the condition (cond=...) for the discriminator")
        return torch.cat([images, cond], dim=1)

    def generator_loss(self, codebook_loss: Optional[torch.Tensor], inputs: torch.Tensor,
                       reconstructions: torch.Tensor, global_step: int, last_layer: Optional[torch.Tensor] = None,
                       cond: Optional[torch.Tensor] = None, predicted_indices: Optional[torch.Tensor] = None,
                       ) -> dict[str, torch.Tensor]:
        """The autoencoder's loss (``"loss"``, differentiable) and its parts (detached) for logging.

        Without gradients (validation) or ``last_layer`` the adaptive weight is 0, as in CompVis.
        """
        if codebook_loss is None:
            codebook_loss = torch.zeros((), device=inputs.device)
        rec = self.pixel_weight * self.pixel_loss(inputs, reconstructions)
        parts: dict[str, torch.Tensor] = {}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions)
            rec = rec + self.perceptual_weight * p_loss
            parts["p_loss"] = p_loss.detach().mean()
        nll_loss = rec.mean()
        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -logits_fake.mean()
        disc_factor = self.disc_factor_at(global_step)
        d_weight = torch.zeros((), device=inputs.device)
        loss = nll_loss + self.codebook_weight * codebook_loss.mean()
        if disc_factor > 0:
            if last_layer is not None and torch.is_grad_enabled() and g_loss.requires_grad:
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            loss = loss + d_weight * disc_factor * g_loss
        if predicted_indices is not None and self.n_classes is not None:
            parts["perplexity"], parts["cluster_usage"] = codebook_perplexity(predicted_indices, self.n_classes)
        return {"loss": loss, "quant_loss": codebook_loss.detach().mean(), "nll_loss": nll_loss.detach(),
                "rec_loss": nll_loss.detach(), "g_loss": g_loss.detach(), "d_weight": d_weight,
                "disc_factor": torch.tensor(disc_factor, device=inputs.device), **parts}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The discriminator's loss (``"disc_loss"``) and its mean logits on real and reconstructed images."""
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
        disc_factor = self.disc_factor_at(global_step)
        return {"disc_loss": disc_factor * self.disc_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean(),
                "disc_factor": torch.tensor(disc_factor, device=inputs.device)}

    def forward(self, codebook_loss: Optional[torch.Tensor], inputs: torch.Tensor, reconstructions: torch.Tensor,
                optimizer_idx: int, global_step: int, last_layer: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, split: str = "train",
                predicted_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The CompVis call: ``(loss, {"<split>/<name>": value})`` for optimizer 0 (autoencoder) or 1."""
        if optimizer_idx == 0:
            parts = self.generator_loss(codebook_loss, inputs, reconstructions, global_step, last_layer, cond,
                                        predicted_indices)
            loss = parts.pop("loss")
            parts["total_loss"] = loss.detach()
        elif optimizer_idx == 1:
            parts = self.discriminator_loss(inputs, reconstructions, global_step, cond)
            loss = parts["disc_loss"]
        else:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}")
        return loss, {f"{split}/{k}": v.detach() for k, v in parts.items()}
