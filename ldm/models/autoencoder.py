"""``AutoencoderKL``: the first stage that maps images to latents and back.

The network and the latent distribution live here; first-stage training losses are
configured through ``lossconfig`` and run by the Lightning hooks in this module:

* ``lossconfig: null``: MSE + ``kl_weight`` * KL, one optimizer (the bundled demo).
* a loss with a ``discriminator`` (``ldm.modules.losses.LPIPSWithDiscriminator``): Lightning manual
  optimization, an autoencoder step then a discriminator step on every batch. Lightning counts
  both in ``global_step``, so ``trainer.max_steps`` is twice the number of batches; the loss's
  ``disc_start`` counts batches, as in CompVis. Lightning refuses ``trainer.gradient_clip_val``
  and ``accumulate_grad_batches`` with manual optimization; multi-GPU runs need
  ``trainer.strategy=ddp_find_unused_parameters_true`` (each step leaves one network without gradients).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import images_to_bchw, instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    def __init__(
        self,
        ddconfig: dict,
        lossconfig: Optional[dict],
        embed_dim: int,
        ckpt_path: Optional[str] = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: Optional[int] = None,
        monitor: Optional[str] = None,
        ema_decay: Optional[float] = None,
        learn_logvar: bool = False,
        kl_weight: float = 1e-6,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and log-variance)")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig) if lossconfig else nn.Identity()
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.kl_weight = kl_weight
        self.learn_logvar = learn_logvar
        if isinstance(getattr(self.loss, "logvar", None), nn.Parameter):
            self.loss.logvar.requires_grad_(learn_logvar)  # a fixed logvar (CompVis) gets no gradient at all
        if self.has_discriminator:
            self.automatic_optimization = False  # two optimizers per batch, stepped in _adversarial_losses
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            from ldm.checkpoint import load_into_model, read_state_dict

            state = {k: v for k, v in read_state_dict(ckpt_path).items() if not any(k.startswith(i) for i in ignore_keys)}
            load_into_model(self, state, strict=False)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: dict, key: Optional[str] = None) -> torch.Tensor:
        """Images from a batch as float [B, C, H, W]; accepts channels-last [B, H, W, C] too."""
        return images_to_bchw(batch[key or self.image_key])

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    @property
    def has_discriminator(self) -> bool:
        return isinstance(getattr(self.loss, "discriminator", None), nn.Module)

    @property
    def loss_step(self) -> int:
        """Training batches so far: the step a loss's ``disc_start`` refers to."""
        # Manual optimization counts every optimizer step in global_step: two per batch here.
        return self.global_step // 2 if self.has_discriminator else self.global_step

    # Lightning surface: a plain reconstruction + KL objective unless lossconfig supplies one.
    def _losses(self, batch: dict) -> dict[str, Any]:
        x = self.get_input(batch)
        rec, posterior = self(x)
        if isinstance(self.loss, nn.Identity):
            rec_loss = torch.nn.functional.mse_loss(rec, x)
            kl = posterior.kl().mean() / x[0].numel()
            return {"loss": rec_loss + self.kl_weight * kl, "rec_loss": rec_loss, "kl_loss": kl}
        loss = self.loss(x, rec, posterior, split="train", last_layer=self.get_last_layer())
        return loss if isinstance(loss, dict) else {"loss": loss}

    def _adversarial_losses(self, batch: dict, optimizers: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """Autoencoder then discriminator loss; with ``optimizers`` (training) each one steps after its loss."""
        x = self.get_input(batch)
        step = self.loss_step
        opt_ae, opt_disc = optimizers or (None, None)
        with self.toggled_optimizer(opt_ae) if opt_ae is not None else contextlib.nullcontext():
            rec, posterior = self(x)
            losses = self.loss.generator_loss(x, rec, posterior, step, last_layer=self.get_last_layer())
            if opt_ae is not None:
                opt_ae.zero_grad()
                self.manual_backward(losses["loss"])
                opt_ae.step()
        with self.toggled_optimizer(opt_disc) if opt_disc is not None else contextlib.nullcontext():
            losses.update(self.loss.discriminator_loss(x, rec.detach(), step))
            if opt_disc is not None:
                opt_disc.zero_grad()
                self.manual_backward(losses["disc_loss"])
                opt_disc.step()
        return {k: v.detach() for k, v in losses.items()}

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        if self.has_discriminator:
            losses = self._adversarial_losses(batch, self.optimizers())
            shown = ("loss", "rec_loss", "disc_loss")
            self.log_dict({f"train/{k}": v for k, v in losses.items() if k not in shown})
            self.log_dict({f"train/{k}": losses[k] for k in shown}, prog_bar=True)
            return None
        losses = self._losses(batch)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._adversarial_losses(batch) if self.has_discriminator else self._losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True)

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 4.5e-6)
        params = [*self.encoder.parameters(), *self.decoder.parameters(),
                  *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]
        if self.learn_logvar and isinstance(getattr(self.loss, "logvar", None), nn.Parameter):
            params.append(self.loss.logvar)
        opt_ae = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
        if not self.has_discriminator:
            return opt_ae
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (pixel-space diffusion through the latent API)."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def forward(self, x, *args, **kwargs):
        return x


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """The name ``sgm`` configs give the SDXL autoencoder at inference: the same model and keys."""
