"""What the KL (``contperceptual``) and VQ (``vqperceptual``) first-stage objectives share.

Both add a PatchGAN term to a reconstruction loss:

    g    = -mean(D(r))
    loss = <reconstruction and regulariser terms> + d_weight * disc_factor * g

``d_weight = disc_weight * |grad nll| / (|grad g| + 1e-4)``, both gradients taken at the decoder's last
layer, balances the two terms (Esser et al. 2021, "Taming Transformers"); ``disc_factor`` is 0 before
``disc_start``. The discriminator's own loss is ``disc_factor * hinge (or vanilla) loss`` on x and r.
Only the reconstruction/regulariser part differs between the two objectives; it lives in their modules.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

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


class AdversarialObjective(nn.Module):
    """The optional LPIPS term, the discriminator, its schedule and its loss; subclasses add the rest."""

    def __init__(self, *, disc_start: int, disc_num_layers: int, disc_in_channels: int, disc_factor: float,
                 disc_weight: float, perceptual_weight: float, use_actnorm: bool, disc_conditional: bool,
                 disc_ndf: int, disc_loss: str, perceptual_weights: Optional[str]):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(DISC_LOSSES)}, got {disc_loss!r}")
        self.disc_start = int(disc_start)
        self.perceptual_loss: Optional[LPIPS] = None
        if perceptual_weight > 0 and perceptual_weights:
            self.perceptual_loss = LPIPS(perceptual_weights)
        elif perceptual_weight > 0:
            warnings.warn(f"{type(self).__name__}: perceptual_weight={perceptual_weight} but no perceptual_weights "
                          f"file, so the perceptual (LPIPS) term is off; to enable it, {ENABLE_HINT}; "
                          "perceptual_weight: 0 silences this warning", UserWarning, stacklevel=3)
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

    def add_perceptual(self, rec: torch.Tensor, inputs: torch.Tensor, reconstructions: torch.Tensor,
                       parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``rec + perceptual_weight * LPIPS(x, r)`` (its mean logged as ``p_loss``), or ``rec`` when it is off."""
        if self.perceptual_loss is None:
            return rec
        p_loss = self.perceptual_loss(inputs, reconstructions)
        parts["p_loss"] = p_loss.detach().mean()
        return rec + self.perceptual_weight * p_loss

    def adversarial_term(self, nll_loss: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                         last_layer: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``d_weight * disc_factor * g`` and its logged parts (``g_loss``, ``d_weight``, ``disc_factor``).

        Without gradients (validation) or ``last_layer`` the adaptive weight is 0, as in CompVis.
        """
        device = reconstructions.device
        g_loss = -self.discriminator(self._disc_input(reconstructions, cond)).mean()
        disc_factor = self.disc_factor_at(global_step)
        d_weight = torch.zeros((), device=device)
        term = torch.zeros((), device=device)
        if disc_factor > 0:
            if last_layer is not None and torch.is_grad_enabled() and g_loss.requires_grad:
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            term = d_weight * disc_factor * g_loss
        return term, {"g_loss": g_loss.detach(), "d_weight": d_weight,
                      "disc_factor": torch.tensor(disc_factor, device=device)}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The discriminator's loss (``"disc_loss"``) and its mean logits on real and reconstructed images."""
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
        disc_factor = self.disc_factor_at(global_step)
        return {"disc_loss": disc_factor * self.disc_loss(logits_real, logits_fake),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean(),
                "disc_factor": torch.tensor(disc_factor, device=inputs.device)}

    @staticmethod
    def logged(loss: torch.Tensor, parts: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, dict]:
        """The CompVis return value: ``(loss, {"<split>/<name>": detached value})``."""
        return loss, {f"{split}/{k}": v.detach() for k, v in parts.items()}
