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

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.perceptual import ENABLE_HINT, LPIPS


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits: -log sigmoid(real) and -log(1 - sigmoid(fake)), averaged."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


DISC_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """``|grad nll| / (|grad g| + 1e-4)`` at ``last_layer``, clamped to [0, 1e4] and detached."""
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class LPIPSWithDiscriminator(nn.Module):
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
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(DISC_LOSSES)}, got {disc_loss!r}")
        self.disc_start = int(disc_start)
        self.kl_weight = float(kl_weight)
        self.pixel_weight = float(pixelloss_weight)
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))  # trained only with learn_logvar
        self.perceptual_loss: Optional[LPIPS] = None
        if perceptual_weight > 0 and perceptual_weights:
            self.perceptual_loss = LPIPS(perceptual_weights)
        elif perceptual_weight > 0:
            warnings.warn(f"LPIPSWithDiscriminator: perceptual_weight={perceptual_weight} but no perceptual_weights "
                          f"file, so the perceptual (LPIPS) term is off; to enable it, {ENABLE_HINT}; "
                          "perceptual_weight: 0 silences this warning", UserWarning, stacklevel=2)
        self.perceptual_weight = float(perceptual_weight) if self.perceptual_loss is not None else 0.0
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.disc_conditional = disc_conditional
        self.disc_loss = DISC_LOSSES[disc_loss]

    def disc_factor_at(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before: the GAN waits for a decent autoencoder."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def _disc_input(self, images: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.disc_conditional:
            return images
        if cond is None:
            raise ValueError("disc_conditional: true needs the condition (cond=...) for the discriminator")
        return torch.cat([images, cond], dim=1)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       posteriors: DiagonalGaussianDistribution,
                       global_step: int, last_layer: Optional[torch.Tensor] = None,
                       cond: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                       ) -> dict[str, torch.Tensor]:
        """The autoencoder's loss (``"loss"``, differentiable) and its parts (detached) for logging.

        Without gradients (validation) or ``last_layer`` the adaptive weight is 0, as in CompVis.
        """
        batch = inputs.shape[0]
        rec = self.pixel_weight * (inputs - reconstructions).abs()
        parts: dict[str, torch.Tensor] = {}
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions)
            rec = rec + self.perceptual_weight * p_loss
            parts["p_loss"] = p_loss.detach().mean()
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / batch
        weighted_nll = (nll * weights).sum() / batch if weights is not None else nll_loss
        kl_loss = posteriors.kl().sum() / batch

        logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
        g_loss = -logits_fake.mean()
        disc_factor = self.disc_factor_at(global_step)
        d_weight = torch.zeros((), device=inputs.device)
        loss = weighted_nll + self.kl_weight * kl_loss
        if disc_factor > 0:
            if last_layer is not None and torch.is_grad_enabled() and g_loss.requires_grad:
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            loss = loss + d_weight * disc_factor * g_loss
        return {"loss": loss, "nll_loss": nll_loss.detach(), "rec_loss": rec.detach().mean(),
                "kl_loss": kl_loss.detach(), "g_loss": g_loss.detach(), "d_weight": d_weight,
                "disc_factor": torch.tensor(disc_factor, device=inputs.device), "logvar": self.logvar.detach(),
                **parts}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The discriminator's loss (``"disc_loss"``) and its mean logits on real and reconstructed images."""
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
        disc_factor = self.disc_factor_at(global_step)
        return {"disc_loss": disc_factor * self.disc_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean(),
                "disc_factor": torch.tensor(disc_factor, device=inputs.device)}

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
        return loss, {f"{split}/{k}": v.detach() for k, v in parts.items()}
