"""``DiffusionEngine``: SDXL (base and refiner) as Stability's ``sgm`` configs declare it.

Parts and checkpoint keys as in the official files: ``model.diffusion_model.*`` (the UNet, driven by
``crossattn`` context and the ``vector`` of pooled text + micro-conditioning), ``conditioner.embedders.N.*``,
``first_stage_model.*`` and ``denoiser.sigmas``. It offers the same surface as ``LatentDiffusion``
to the shared sampling core (``apply_model``, ``alphas_cumprod``, ``parameterization``) and to
generation (``conditioner``, ``encode_first_stage`` / ``decode_first_stage``, ``scale_factor``), and
trains through the same Lightning mixin (``shared_step``: the eps/v loss of the same schedule).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.diffusion import schedule as sched
from ldm.models.diffusion.training import DiffusionTrainingMixin
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import disabled_train, images_to_bchw, instantiate_from_config


class _NetworkWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (sgm's OpenAIWrapper layout: keys ``model.diffusion_model.*``)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = network

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "concat" in cond:
            x = torch.cat([x, cond["concat"].to(x)], dim=1)
        extra = {"timestep_cond": cond["timestep_cond"]} if "timestep_cond" in cond else {}
        return self.diffusion_model(x, t, context=cond.get("crossattn"), y=cond.get("vector"), **extra)


class DiffusionEngine(DiffusionTrainingMixin, pl.LightningModule):
    def __init__(
        self,
        network_config: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        conditioner_config: Optional[Mapping[str, Any]] = None,
        sampler_config: Optional[Mapping[str, Any]] = None,
        optimizer_config: Optional[Mapping[str, Any]] = None,
        scheduler_config: Optional[Mapping[str, Any]] = None,
        loss_fn_config: Optional[Mapping[str, Any]] = None,
        network_wrapper: Optional[str] = None,
        ckpt_path: Optional[str] = None,
        use_ema: bool = False,
        ema_decay_rate: float = 0.9999,
        scale_factor: float = 1.0,
        disable_first_stage_autocast: bool = False,
        input_key: str = "jpg",
        log_keys: Optional[Sequence[str]] = None,
        no_cond_log: bool = False,
        compile_model: bool = False,
        en_and_decode_n_samples_a_time: Optional[int] = None,
    ) -> None:
        super().__init__()
        if network_wrapper not in (None, "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"):
            raise ValueError(f"DiffusionEngine: network_wrapper {network_wrapper!r} is not supported (use the default)")
        # sampler_config / optimizer_config / log_keys / compile_model: sampling and training are configured
        # by this framework's own settings (scripts, main.py); the published values are accepted and unused.
        self.model = _NetworkWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config or {"target": "ldm.modules.GeneralConditioner",
                                                                           "params": {"emb_models": []}})
        first = instantiate_from_config(first_stage_config).eval()
        first.train = disabled_train.__get__(first)
        for p in first.parameters():
            p.requires_grad_(False)
        self.first_stage_model = first
        self.scale_factor = float(scale_factor)
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.input_key, self.first_stage_key = input_key, input_key
        self.loss_fn_config = loss_fn_config
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.parameterization = self.denoiser.parameterization
        self.register_buffer("alphas_cumprod", self.denoiser.alphas_cumprod, persistent=False)
        self.num_timesteps = int(self.alphas_cumprod.shape[0])
        self.channels = int(network_config.get("params", {}).get("out_channels", 4))
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay_rate)
        if ckpt_path is not None:
            from ldm.checkpoint import load_into_model, read_state_dict

            load_into_model(self, read_state_dict(ckpt_path), strict=False)

    # ---- the surface the sampling core and generation use ------------------------------------
    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """An empty negative prompt means zero text embeddings (SDXL base, as diffusers and sgm's sampler do);
        the refiner (one text encoder) encodes "" instead, like diffusers' refiner pipeline."""
        return len(self.conditioner.text_encoders()) > 1

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model(x, t, cond)

    def get_learned_conditioning(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The conditioning dict of a batch (``txt`` prompts, sizes, crops, ...) through the conditioner."""
        return self.conditioner(batch)

    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x.to(next(self.first_stage_model.parameters()).dtype))

    def get_first_stage_encoding(self, posterior: Any, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = posterior.sample(generator) if isinstance(posterior, DiagonalGaussianDistribution) else posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode((z / self.scale_factor).to(next(self.first_stage_model.parameters()).dtype))

    # ---- training: the same loss as LatentDiffusion, on sgm-style batches --------------------
    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = images_to_bchw(batch[self.input_key]).to(self.device)
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).float()
        cond = self.conditioner(batch)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        alpha_bar = self.alphas_cumprod[t]
        output = self.apply_model(sched.q_sample(z, alpha_bar, noise), t, cond)
        target = sched.training_target(z, noise, alpha_bar, self.parameterization)
        loss = F.mse_loss(output.float(), target.float())
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss": loss}
