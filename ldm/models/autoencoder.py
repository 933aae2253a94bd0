"""``AutoencoderKL`` and ``VQModel``: the first stages that map images to latents and back.

``VQModelInterface`` (CompVis' VQ latent-diffusion first stage) and ``IdentityFirstStage`` live here too.

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
import warnings
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.vqvae.quantize import VectorQuantizer2
from ldm.util import images_to_bchw, instantiate_from_config


class FirstStageTraining(pl.LightningModule):
    """The training surface both autoencoders share: one optimizer on a plain objective, or (a loss with a
    ``discriminator``) manual optimization with an autoencoder step then a discriminator step per batch.

    Subclasses give ``_plain_losses(batch)`` and ``_generator_losses(x, step) -> (losses, reconstructions)``.
    """

    scheduler_config: Optional[dict] = None

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

    def _plain_losses(self, batch: dict) -> dict[str, Any]:
        raise NotImplementedError

    def _generator_losses(self, x: torch.Tensor, step: int) -> tuple[dict[str, Any], torch.Tensor]:
        raise NotImplementedError

    def _adversarial_losses(self, batch: dict, optimizers: Optional[Sequence[Any]] = None) -> dict[str, Any]:
        """Autoencoder then discriminator loss; with ``optimizers`` (training) each one steps after its loss."""
        x = self.get_input(batch)
        step = self.loss_step
        opt_ae, opt_disc = optimizers or (None, None)
        with self.toggled_optimizer(opt_ae) if opt_ae is not None else contextlib.nullcontext():
            losses, rec = self._generator_losses(x, step)
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

    def _schedulers(self) -> list:
        if self.scheduler_config is None:
            return []
        schedulers = self.lr_schedulers()
        return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        if not self.has_discriminator:
            losses = self._plain_losses(batch)
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True)
            return losses["loss"]
        losses = self._adversarial_losses(batch, self.optimizers())
        for scheduler in self._schedulers():
            scheduler.step()  # manual optimization: Lightning does not step them
        shown = ("loss", "rec_loss", "disc_loss")
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k not in shown})
        self.log_dict({f"train/{k}": losses[k] for k in shown}, prog_bar=True)
        return None


class AutoencoderKL(FirstStageTraining):
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

    # Lightning surface: a plain reconstruction + KL objective unless lossconfig supplies one.
    def _plain_losses(self, batch: dict) -> dict[str, Any]:
        x = self.get_input(batch)
        rec, posterior = self(x)
        if isinstance(self.loss, nn.Identity):
            rec_loss = torch.nn.functional.mse_loss(rec, x)
            kl = posterior.kl().mean() / x[0].numel()
            return {"loss": rec_loss + self.kl_weight * kl, "rec_loss": rec_loss, "kl_loss": kl}
        loss = self.loss(x, rec, posterior, split="train", last_layer=self.get_last_layer())
        return loss if isinstance(loss, dict) else {"loss": loss}

    def _generator_losses(self, x: torch.Tensor, step: int) -> tuple[dict[str, Any], torch.Tensor]:
        rec, posterior = self(x)
        return self.loss.generator_loss(x, rec, posterior, step, last_layer=self.get_last_layer()), rec

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses = self._adversarial_losses(batch) if self.has_discriminator else self._plain_losses(batch)
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


class VQModel(FirstStageTraining):
    """A VQ autoencoder (VQGAN, CompVis' ``VQModel``): encoder, ``quant_conv``, codebook, ``post_quant_conv``, decoder.

    Constructor and state-dict keys as CompVis (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
    ``quant_conv.*``, ``post_quant_conv.*``, ``loss.*``, ``model_ema.*`` with ``use_ema``). Training follows
    ``lossconfig`` as :class:`AutoencoderKL` does: ``torch.nn.Identity`` (or null) trains MSE + codebook loss
    with one optimizer; ``ldm.modules.losses.VQLPIPSWithDiscriminator`` adds the discriminator, with an
    autoencoder step (learning rate ``lr_g_factor * learning_rate``) then a discriminator step per batch.
    """

    def __init__(
        self,
        ddconfig: dict,
        lossconfig: Optional[dict],
        n_embed: int,
        embed_dim: int,
        ckpt_path: Optional[str] = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: Optional[int] = None,
        monitor: Optional[str] = None,
        batch_resize_range: Optional[Sequence[int]] = None,
        scheduler_config: Optional[dict] = None,
        lr_g_factor: float = 1.0,
        remap: Optional[str] = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
    ):
        super().__init__()
        if ddconfig.get("double_z", True):
            raise ValueError("VQModel needs ddconfig.double_z: false (the encoder feeds z_channels to the quantizer)")
        if batch_resize_range is not None and len(batch_resize_range) != 2:
            raise ValueError(f"batch_resize_range must be [min_size, max_size], got {batch_resize_range!r}")
        self.embed_dim, self.n_embed, self.image_key = embed_dim, n_embed, image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig) if lossconfig else nn.Identity()
        self.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, int(colorize_nlabels), 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.batch_resize_range = tuple(batch_resize_range) if batch_resize_range is not None else None
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        if self.has_discriminator:
            self.automatic_optimization = False  # two optimizers per batch, stepped in _adversarial_losses
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        from ldm.checkpoint import load_into_model, read_state_dict

        state = {k: v for k, v in read_state_dict(path).items() if not any(k.startswith(i) for i in ignore_keys)}
        load_into_model(self, state, strict=False)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.encoder.num_resolutions - 1)

    @contextlib.contextmanager
    def ema_scope(self, context: Optional[str] = None):
        """Run the block with the EMA weights swapped in (no-op without ``use_ema``)."""
        if not self.use_ema:
            yield
            return
        with self.model_ema.average_parameters(self):
            yield

    def encode(self, x: torch.Tensor):
        """``(quant, emb_loss, (perplexity, None, indices))``: the quantized latents and the quantizer's loss."""
        return self.quantize(self.encode_to_prequant(x))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Images of codebook indices [B, H, W] (or [B, H*W] with a square grid)."""
        if code_b.dim() == 2:
            side = int(round(code_b.shape[1] ** 0.5))
            if side * side != code_b.shape[1]:
                raise ValueError(f"decode_code: {code_b.shape[1]} codes per image is not a square grid; pass [B, H, W]")
            code_b = code_b.reshape(code_b.shape[0], side, side)
        b, h, w = code_b.shape
        return self.decode(self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim)))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False):
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_input(self, batch: dict, k: Optional[str] = None) -> torch.Tensor:
        """Images of a batch as float [B, C, H, W]; with ``batch_resize_range`` resized to a random multiple of
        16 in that range (the largest size for the first batches, as CompVis, so memory peaks early)."""
        x = images_to_bchw(batch[k or self.image_key])
        if self.batch_resize_range is None:
            return x
        low, high = self.batch_resize_range
        size = high if self.loss_step <= 4 else int(16 * torch.randint(low // 16, high // 16 + 1, ()).item())
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    # Lightning surface.
    def _plain_losses(self, batch: dict) -> dict[str, Any]:
        """Without a discriminator: MSE reconstruction + codebook loss (``Identity``), or the loss's generator side."""
        x = self.get_input(batch)
        rec, qloss, ind = self(x, return_pred_indices=True)
        if isinstance(self.loss, nn.Identity):
            rec_loss = F.mse_loss(rec, x)
            return {"loss": rec_loss + qloss, "rec_loss": rec_loss, "quant_loss": qloss.detach()}
        return self.loss.generator_loss(qloss, x, rec, self.loss_step, last_layer=self.get_last_layer(),
                                        predicted_indices=ind)

    def _generator_losses(self, x: torch.Tensor, step: int) -> tuple[dict[str, Any], torch.Tensor]:
        rec, qloss, ind = self(x, return_pred_indices=True)
        losses = self.loss.generator_loss(qloss, x, rec, step, last_layer=self.get_last_layer(), predicted_indices=ind)
        return losses, rec

    def on_train_batch_end(self, *args: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        for suffix in ("", "_ema") if self.use_ema else ("",):
            with self.ema_scope() if suffix else contextlib.nullcontext():
                losses = self._adversarial_losses(batch) if self.has_discriminator else self._plain_losses(batch)
            self.log_dict({f"val{suffix}/{k}": v.detach() for k, v in losses.items()}, sync_dist=True)

    def configure_optimizers(self):
        lr = getattr(self, "learning_rate", 4.5e-6)
        params = [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantize.parameters(),
                  *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]
        opt_ae = torch.optim.Adam(params, lr=self.lr_g_factor * lr, betas=(0.5, 0.9))
        optimizers = [opt_ae]
        if self.has_discriminator:
            optimizers.append(torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9)))
        if self.scheduler_config is None:
            return optimizers if len(optimizers) > 1 else opt_ae
        schedule = instantiate_from_config(self.scheduler_config)
        lr_lambda = schedule.schedule if hasattr(schedule, "schedule") else schedule
        return optimizers, [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), "interval": "step",
                             "frequency": 1} for opt in optimizers]

    @torch.no_grad()
    def log_images(self, batch: dict, only_inputs: bool = False, plot_ema: bool = False,
                   split: Optional[str] = None, N: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``inputs`` and ``reconstructions`` (and ``reconstructions_ema``) in [-1, 1], for image loggers."""
        x = self.get_input(batch).to(self.device)[:N]
        log = {"inputs": self.to_rgb(x) if x.shape[1] > 3 else x}
        if only_inputs:
            return log
        rec = self(x)[0]
        log["reconstructions"] = self.to_rgb(rec) if rec.shape[1] > 3 else rec
        if plot_ema and self.use_ema:
            with self.ema_scope():
                rec = self(x)[0]
            log["reconstructions_ema"] = self.to_rgb(rec) if rec.shape[1] > 3 else rec
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """A fixed random projection of many-channel images (segmentations) to RGB in [-1, 1]."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize.to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8) - 1.0


class VQModelInterface(VQModel):
    """The VQ first stage of latent diffusion: ``encode`` stops before the codebook (diffusion runs on the
    continuous latents) and ``decode`` quantizes first, unless ``force_not_quantize``."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing (pixel-space diffusion through the latent API), as CompVis.

    ``vq_interface=True`` makes ``quantize`` answer like a VQ quantizer: ``(x, None, [None, None, None])``.
    CompVis' signature takes any other arguments and ignores them; here they are ignored with a warning.
    """

    downsample_factor = 1
    _warned = False

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any):
        super().__init__()
        self.vq_interface = vq_interface
        if (args or kwargs) and not IdentityFirstStage._warned:
            IdentityFirstStage._warned = True
            names = [f"positional argument {i}" for i in range(len(args))] + [repr(k) for k in kwargs]
            warnings.warn(f"IdentityFirstStage ignores {', '.join(names)}: it only takes vq_interface "
                          "(check the spelling, or remove them from the config)", UserWarning, stacklevel=2)

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """The name ``sgm`` configs give the SDXL autoencoder at inference: the same model and keys."""
