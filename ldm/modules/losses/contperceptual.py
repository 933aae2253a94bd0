"""``LPIPSWithDiscriminator``: the Stable Diffusion first-stage objective (CompVis ``contperceptual``).

Autoencoder ("generator") side, for a batch of B images x and reconstructions r:

    rec  = pixelloss_weight * |x - r| + perceptual_weight * LPIPS(x, r)     (per pixel)
    nll  = sum(rec / exp(logvar) + logvar) / B                              (logvar: a scalar)
    kl   = sum(KL(q(z|x) || N(0, I))) / B
    g    = -mean(D(r))
    loss = nll + kl_weight * kl + d_weight * disc_factor * g

``d_weight = disc_weight * |grad nll| / (|grad g| + 1e-4)``, both gradients taken at the decoder's
last layer, balances the two terms (Esser et al. 2021, "Taming Transformers"); ``disc_factor`` is 0
before ``disc_start``. Discriminator side: ``disc_factor * hinge (or vanilla) loss`` on x and r.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.adversarial import (DISC_LOSSES, AdversarialObjective, adaptive_weight,  # noqa: F401
                                            hinge_d_loss, vanilla_d_loss)


class LPIPSWithDiscriminator(AdversarialObjective):
    """Reconstruction (L1 + optional LPIPS) + KL + PatchGAN loss; the CompVis constructor, plus:

    * ``perceptual_weights``: torchvision's VGG16 weights file. Without it the perceptual term is
      off (with a warning), so the published CompVis configs train offline as they are.
    * ``disc_ndf``: the discriminator's base width (CompVis: 64).
    * ``pixelloss_weight`` scales the L1 term (CompVis accepts it but ignores it; the default 1 matches).
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        perceptual_weights: Optional[str] = None,
        disc_ndf: int = 64,
    ):
        super().__init__(disc_start=disc_start, disc_num_layers=disc_num_layers, disc_in_channels=disc_in_channels,
                         disc_factor=disc_factor, disc_weight=disc_weight, perceptual_weight=perceptual_weight,
                         use_actnorm=use_actnorm, disc_conditional=disc_conditional, disc_ndf=disc_ndf,
                         disc_loss=disc_loss, perceptual_weights=perceptual_weights)
        self.kl_weight = float(kl_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))  # trained only with learn_logvar

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       posteriors: DiagonalGaussianDistribution,
                       global_step: int, last_layer: Optional[torch.Tensor] = None,
                       cond: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                       ) -> dict[str, torch.Tensor]:
        """The autoencoder's loss (``"loss"``, differentiable) and its parts (detached) for logging.

        Without gradients (validation) or ``last_layer`` the adaptive weight is 0, as in CompVis.
        """
        batch = inputs.shape[0]
        parts: dict[str, torch.Tensor] = {}
        rec = self.add_perceptual(self.pixel_weight * (inputs - reconstructions).abs(), inputs, reconstructions,
                                  parts)
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / batch
        weighted_nll = (nll * weights).sum() / batch if weights is not None else nll_loss
        kl_loss = posteriors.kl().sum() / batch
        adversarial, gan_parts = self.adversarial_term(nll_loss, reconstructions, global_step, last_layer, cond)
        loss = weighted_nll + self.kl_weight * kl_loss + adversarial
        return {"loss": loss, "nll_loss": nll_loss.detach(), "rec_loss": rec.detach().mean(),
                "kl_loss": kl_loss.detach(), **gan_parts, "logvar": self.logvar.detach(), **parts}

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posteriors: DiagonalGaussianDistribution, optimizer_idx: int,
                global_step: int, last_layer: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                split: str = "train", weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """The CompVis call: ``(loss, {"<split>/<name>": value})`` for optimizer 0 (autoencoder) or 1."""
        if optimizer_idx == 0:
            parts = self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, cond, weights)
            loss = parts.pop("loss")
            parts["total_loss"] = loss.detach()
        else:
            parts = self.discriminator_loss(inputs, reconstructions, global_step, cond)
            loss = parts["disc_loss"]
        return self.logged(loss, parts, split)
