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

from typing import Optional

import torch

from ldm.modules.losses.adversarial import AdversarialObjective, hinge_d_loss, vanilla_d_loss  # noqa: F401
from ldm.modules.vqvae.quantize import codebook_perplexity

PIXEL_LOSSES = {"l1": lambda x, y: (x - y).abs(), "l2": lambda x, y: (x - y).square()}


class VQLPIPSWithDiscriminator(AdversarialObjective):
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
        super().__init__(disc_start=disc_start, disc_num_layers=disc_num_layers, disc_in_channels=disc_in_channels,
                         disc_factor=disc_factor, disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional, disc_ndf=disc_ndf,
                         disc_loss=disc_loss, perceptual_weights=perceptual_weights)
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if perceptual_loss != "lpips":
            raise ValueError(f"perceptual_loss {perceptual_loss!r} is not available; use 'lpips' "
                             "(or perceptual_weight: 0)")
        self.codebook_weight = float(codebook_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.pixel_loss = PIXEL_LOSSES[pixel_loss]
        self.n_classes = n_classes

    def generator_loss(self, codebook_loss: Optional[torch.Tensor], inputs: torch.Tensor,
                       reconstructions: torch.Tensor, global_step: int, last_layer: Optional[torch.Tensor] = None,
                       cond: Optional[torch.Tensor] = None, predicted_indices: Optional[torch.Tensor] = None,
                       ) -> dict[str, torch.Tensor]:
        """The autoencoder's loss (``"loss"``, differentiable) and its parts (detached) for logging.

        Without gradients (validation) or ``last_layer`` the adaptive weight is 0, as in CompVis.
        """
        if codebook_loss is None:
            codebook_loss = torch.zeros((), device=inputs.device)
        parts: dict[str, torch.Tensor] = {}
        rec = self.add_perceptual(self.pixel_weight * self.pixel_loss(inputs, reconstructions), inputs,
                                  reconstructions, parts)
        nll_loss = rec.mean()
        adversarial, gan_parts = self.adversarial_term(nll_loss, reconstructions, global_step, last_layer, cond)
        loss = nll_loss + self.codebook_weight * codebook_loss.mean() + adversarial
        if predicted_indices is not None and self.n_classes is not None:
            parts["perplexity"], parts["cluster_usage"] = codebook_perplexity(predicted_indices, self.n_classes)
        return {"loss": loss, "quant_loss": codebook_loss.detach().mean(), "nll_loss": nll_loss.detach(),
                "rec_loss": nll_loss.detach(), **gan_parts, **parts}

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
        return self.logged(loss, parts, split)
