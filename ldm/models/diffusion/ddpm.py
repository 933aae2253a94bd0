"""``DDPM``, ``LatentDiffusion`` and ``LatentInpaintDiffusion`` (CompVis names and keys).

This file holds the models and the diffusion math (schedule buffers, noising, the loss).
The Lightning training surface lives in ``training.py``; samplers only need
``apply_model``, the schedule buffers and the first/cond stage helpers defined here.
CompVis' ancestral sampling and ``log_images`` methods come from ``compvis_api.py``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion import schedule as sched
from ldm.models.diffusion.compvis_api import CLASS_KEYS, DDPMSamplingMixin, LatentSamplingMixin
from ldm.models.diffusion.training import DiffusionTrainingMixin
from ldm.models.diffusion.wrapper import CONDITIONING_KEYS, DiffusionWrapper  # noqa: F401  (CompVis path)
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.encoders.conditioner import Conditioner, MaskedImageEmbedder, StageEmbedder
from ldm.util import disabled_train, images_to_bchw, instantiate_from_config

class DDPM(DiffusionTrainingMixin, DDPMSamplingMixin, pl.LightningModule):
    """A denoising diffusion model in data space with a discrete schedule."""

    def __init__(
        self,
        unet_config: dict,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: Optional[str] = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas=None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: Optional[str] = None,
        parameterization: str = "eps",
        scheduler_config: Optional[dict] = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        make_it_fit: bool = False,
        ucg_training: Optional[dict] = None,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        snr_gamma: Optional[float] = None,
        ema_decay: float = 0.9999,
    ):
        super().__init__()
        if parameterization not in sched.PARAMETERIZATIONS:
            raise ValueError(f"parameterization {parameterization!r} unknown; use one of {sched.PARAMETERIZATIONS}")
        if loss_type not in ("l1", "l2", "huber"):
            raise ValueError(f"loss_type {loss_type!r} unknown; use l1, l2 or huber")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.snr_gamma = snr_gamma
        self.loss_type = loss_type
        self.ucg_training = dict(ucg_training or {})
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init), device="cpu")
        self.logvar = nn.Parameter(logvar) if learn_logvar else logvar
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys, only_model=load_only_unet)

    # ---- schedule -------------------------------------------------------------------------
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000,
                          linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3) -> None:
        self._schedule_args = (beta_schedule, timesteps, linear_start, linear_end, cosine_s, given_betas)
        tables = sched.schedule_tables(beta_schedule, timesteps, linear_start, linear_end, cosine_s, given_betas, self.v_posterior)
        self.num_timesteps = int(len(tables["betas"]))
        self.linear_start, self.linear_end = linear_start, linear_end
        for name in sched.SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(tables[name], dtype=torch.float32))
        lvlb = sched.vlb_weights(tables, self.parameterization)
        self.register_buffer("lvlb_weights", torch.tensor(lvlb, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def restore_schedule_precision(self, file_dtypes: Mapping[str, torch.dtype]) -> list[str]:
        """Schedule buffers a checkpoint stored in fp16 / bf16 (as "pruned fp16" files do) carry that rounding
        (alphas_cumprod off by up to 2e-4), which every sampler would inherit; diffusers recomputes its schedule
        in float32. Where the file's values are this model's schedule up to that rounding, put back the float32
        values (``file_dtypes``: each key's dtype in the file); a file holding another schedule keeps its own,
        as CompVis loads it. Returns the names restored."""
        rtol = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
        names = [n for n in sched.SCHEDULE_BUFFERS if file_dtypes.get(n) in rtol]
        args = getattr(self, "_schedule_args", None)
        if not names or args is None:
            return []
        tables = sched.schedule_tables(*args, self.v_posterior)
        exact = {}
        for n in names:
            buf = getattr(self, n)
            value = torch.tensor(tables[n], dtype=torch.float32, device=buf.device)
            tol = rtol[file_dtypes[n]] * value.abs() + 1e-7
            if value.shape != buf.shape or bool(((buf.float() - value).abs() > tol).any()):
                return []  # not this config's schedule, rounded: the file's own
            exact[n] = value
        for n, value in exact.items():
            getattr(self, n).copy_(value)
        return names

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        from ldm.checkpoint import load_into_model, read_state_dict

        state = {k: v for k, v in read_state_dict(path).items() if not any(k.startswith(i) for i in ignore_keys)}
        target = self.model if only_model else self
        load_into_model(target, state, strict=False)

    # ---- forward process and loss ---------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return sched.q_sample(x_start, self.alphas_cumprod[t], noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return sched.to_x0_eps(noise, x_t, self.alphas_cumprod[t], "eps")[0]

    def predict_start_from_z_and_v(self, x_t, t, v):
        return sched.to_x0_eps(v, x_t, self.alphas_cumprod[t], "v")[0]

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return sched.to_x0_eps(v, x_t, self.alphas_cumprod[t], "v")[1]

    def get_v(self, x, noise, t):
        return sched.v_from(x, noise, self.alphas_cumprod[t])

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        reduction = "mean" if mean else "none"
        if self.loss_type == "l1":
            return F.l1_loss(pred, target, reduction=reduction)
        if self.loss_type == "huber":
            return F.smooth_l1_loss(pred, target, reduction=reduction)
        return F.mse_loss(pred, target, reduction=reduction)

    def timestep_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: 1, or min-SNR-gamma (Hang et al. 2023) when ``snr_gamma`` is set."""
        if self.snr_gamma is None:
            return torch.ones_like(t, dtype=torch.float32)
        snr = sched.snr(self.alphas_cumprod[t])
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.parameterization]

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        noise = torch.randn_like(x_start) if noise is None else noise
        alpha_bar = self.alphas_cumprod[t]
        x_noisy = sched.q_sample(x_start, alpha_bar, noise)
        output = self.apply_model(x_noisy, t, cond)
        target = sched.training_target(x_start, noise, alpha_bar, self.parameterization)
        per_sample = self.get_loss(output.float(), target.float(), mean=False).mean(dim=list(range(1, x_start.dim())))
        prefix = "train" if self.training else "val"
        loss_simple = per_sample * self.timestep_weights(t)
        if self.learn_logvar or bool(torch.any(self.logvar != 0)):
            logvar_t = self.logvar.to(per_sample.device)[t]
            loss_simple = loss_simple / torch.exp(logvar_t) + logvar_t
        loss = self.l_simple_weight * loss_simple.mean()
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}
        if self.original_elbo_weight > 0:
            loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
            loss = loss + self.original_elbo_weight * loss_vlb
            loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False):
        return self.model(x_noisy, t)

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        return images_to_bchw(batch[k])

    def forward(self, x: torch.Tensor, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)
        return self.p_losses(x, None, t)

    def shared_step(self, batch: dict):
        return self(self.get_input(batch, self.first_stage_key))


class LatentDiffusion(LatentSamplingMixin, DDPM):
    """Diffusion in the latent space of a first stage, conditioned by a cond stage."""

    def __init__(
        self,
        first_stage_config: dict,
        cond_stage_config: Any,
        num_timesteps_cond: Optional[int] = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: Optional[str] = None,
        conditioning_key: Optional[str] = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        *args,
        **kwargs,
    ):
        self.num_timesteps_cond = num_timesteps_cond or 1
        if self.num_timesteps_cond != 1:
            raise NotImplementedError("num_timesteps_cond > 1 (shortened conditioning schedules) is not supported")
        self.scale_by_std = scale_by_std
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.__dict__["_conditioner"] = Conditioner(self.conditioning_embedders())
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    # ---- the conditioner: batch -> conditioning dict --------------------------------------
    @property
    def conditioner(self) -> Conditioner:
        """The embedders over this model's stages (not a submodule: checkpoint keys stay ``cond_stage_model.*``)."""
        return self.__dict__["_conditioner"]

    def conditioning_embedders(self) -> list:
        if self.cond_stage_model is None or self.model.conditioning_key is None:
            return []
        return [StageEmbedder(self.cond_stage_model, self.cond_stage_key, self.get_learned_conditioning,
                              is_trainable=self.cond_stage_trainable)]

    def train(self, mode: bool = True):
        super().train(mode)
        if "_conditioner" in self.__dict__:
            self.conditioner.train(mode)
        return self

    def instantiate_first_stage(self, config: dict) -> None:
        model = instantiate_from_config(config).eval()
        model.train = disabled_train.__get__(model)
        for p in model.parameters():
            p.requires_grad = False
        self.first_stage_model = model

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            if not self.cond_stage_trainable:
                model = model.eval()
                model.train = disabled_train.__get__(model)
                for p in model.parameters():
                    p.requires_grad = False
            self.cond_stage_model = model

    # ---- stages -----------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (e.g. a list of prompts) with the cond stage."""
        model = self.cond_stage_model
        if self.cond_stage_forward is not None:
            return getattr(model, self.cond_stage_forward)(c)
        if hasattr(model, "encode") and callable(model.encode):
            c = model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return model(c)

    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x.to(self._first_stage_dtype()))

    def get_first_stage_encoding(self, encoder_posterior: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"first stage returned {type(encoder_posterior).__name__}; expected a distribution or tensor")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        """Images of latents ``z``; a VQ first stage quantizes them first unless ``force_not_quantize``.
        ``predict_cids``: ``z`` holds codebook logits [B, n_embed, h, w] (or indices [B, h, w]), decoded as their codes."""
        if predict_cids:
            indices = z.argmax(dim=1) if z.dim() == 4 else z.long()
            z = self.first_stage_model.quantize.get_codebook_entry(indices, shape=None).permute(0, 3, 1, 2)
        z = ((1.0 / self.scale_factor) * z).to(self._first_stage_dtype())
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)
        return self.first_stage_model.decode(z)

    def _first_stage_dtype(self) -> torch.dtype:
        p = next(self.first_stage_model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # ---- conditioning and model call ----------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False):
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    def drop_conditioning(self, batch: dict) -> dict:
        """Classifier-free guidance training: per sample, replace ``batch[key]`` by its null value with prob p
        (``ucg_training`` = {key: {p, val}}, and the embedders' own rates), through the conditioner."""
        if not self.training:
            return batch
        return self.conditioner.drop(batch, self.ucg_training)

    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  return_x: bool = False, **kwargs):
        """[z, c]: latents of ``batch[k]`` and the (encoded unless trainable) conditioning (CompVis order).

        ``return_first_stage_outputs`` appends the images x and their reconstruction, ``return_x`` x,
        ``return_original_cond`` the raw conditioning input (e.g. the captions)."""
        if "moments" in batch:  # from ldm.data.latent_cache: the encoders already ran
            return self._get_cached_input(batch, bs, return_first_stage_outputs, return_original_cond, return_x)
        batch = self.drop_conditioning(batch)
        x = images_to_bchw(batch[k])[:bs]
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.encode_first_stage(x.to(self.device))).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_unconditional():
            cond_key = cond_key or self.cond_stage_key
            xc = batch[cond_key] if cond_key not in ("image", k) else x
            xc = xc[:bs] if bs is not None else xc
            if cond_key in CLASS_KEYS:  # CompVis' ClassEmbedder reads its labels from a batch dict, under its own key
                xc = {getattr(self.cond_stage_model, "key", cond_key): xc}
            c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
        out = [z, c]
        if return_first_stage_outputs:
            out += [x, self.decode_first_stage(z)]
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def _get_cached_input(self, batch: dict, bs: Optional[int], return_first_stage_outputs: bool,
                          return_original_cond: bool = False, return_x: bool = False):
        """(z, c) from cached posterior moments and contexts, drawing randomness in the uncached order."""
        dropped = self.drop_conditioning(batch)
        moments = batch["moments"][:bs].to(self.device, torch.float32)
        z = self.get_first_stage_encoding(DiagonalGaussianDistribution(moments)).detach()
        c = None
        if self.model.conditioning_key is not None and not self.force_unconditional():
            key = self.cond_stage_key
            if "context" in batch:
                c = batch["context"][:bs].to(self.device)
                swaps = [(i, new) for i, (old, new) in enumerate(zip(batch[key], dropped[key])) if new != old and i < len(c)]
                if swaps:
                    c = c.clone()
                    for i, value in swaps:
                        c[i] = self._null_context(value).to(c)
            else:  # the text encoder trains: encode captions now
                xc = dropped[key][:bs] if bs is not None else dropped[key]
                c = self.get_learned_conditioning(xc) if not self.cond_stage_trainable else xc
        out = [z, c]
        if return_first_stage_outputs:
            out += [None, self.decode_first_stage(z)]
        if return_x:
            out.append(None)
        if return_original_cond:
            key = self.cond_stage_key
            out.append(batch[key][:bs] if key in batch else None)
        return out

    @torch.no_grad()
    def _null_context(self, value: str) -> torch.Tensor:
        """Context of a classifier-free-guidance null caption (frozen text encoder: computed once)."""
        store = self.__dict__.setdefault("_null_contexts", {})
        if value not in store:
            store[value] = self.get_learned_conditioning([value])[0].detach()
        return store[value]

    def force_unconditional(self) -> bool:
        return self.cond_stage_model is None

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)
        if self.model.conditioning_key is not None and self.cond_stage_trainable and c is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t)

    def shared_step(self, batch: dict, **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)


class LatentInpaintDiffusion(LatentDiffusion):
    """Inpainting: the UNet also sees the mask and the masked image's latents (9 channels)."""

    def __init__(self, *args, concat_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image",
                 finetune_keys=None, keep_finetune_dims: int = 4, c_concat_log_start=None, c_concat_log_end=None, **kwargs):
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        if masked_image_key not in self.concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} must be one of concat_keys {self.concat_keys}")
        super().__init__(*args, **kwargs)

    def conditioning_embedders(self) -> list:
        return [*super().conditioning_embedders(),
                MaskedImageEmbedder(self._encode_images, self.concat_keys, self.masked_image_key)]

    def _encode_images(self, images: torch.Tensor, sample: bool) -> torch.Tensor:
        posterior = self.encode_first_stage(images.to(self.device))
        if sample:
            return self.get_first_stage_encoding(posterior)
        return self.scale_factor * (posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior)

    def inpaint_conditioning(self, batch: dict, latent_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Concatenated channels: the mask resized to latent size and the masked image encoded."""
        return self.conditioner({k: batch[k] for k in self.concat_keys}, kinds=["concat"])["concat"]

    def get_input(self, batch: dict, k: str, **kwargs):
        z, c, *rest = super().get_input(batch, k, **kwargs)
        bs = kwargs.get("bs")
        sub = {key: batch[key][:bs] for key in self.concat_keys}
        with torch.no_grad():
            c_cat = self.inpaint_conditioning(sub)
        return [z, {"c_concat": [c_cat], "c_crossattn": [c]}, *rest]


# SD 2's upscaler and depth-to-image models live in their own modules (which subclass LatentDiffusion from
# here); they are importable from this CompVis path too, resolved on first use so either module can be
# imported first.
_SUBMODULE_CLASSES = {"LatentUpscaleDiffusion": "ldm.models.diffusion.upscaling",
                      "LatentDepth2ImageDiffusion": "ldm.models.diffusion.depth2img"}


def __getattr__(name: str):
    if name in _SUBMODULE_CLASSES:
        import importlib

        return getattr(importlib.import_module(_SUBMODULE_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
