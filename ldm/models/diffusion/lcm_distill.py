"""Latent consistency distillation into LoRA adapters (LCM-LoRA; Luo et al. 2023, "LCM-LoRA").

    python main.py experiment=lcm_lora_digits      # the bundled demo model -> <run>/export/lcm-lora.safetensors
    python scripts/txt2img.py --lora <run>/export/lcm-lora.safetensors --sampler lcm --steps 2 --scale 1 ...

The base model (a ``LatentDiffusion`` config + weights; by default the bundled demo) is frozen and is its own
teacher: with the adapters switched off it takes one DDIM step of its classifier-free-guided probability-flow
ODE, from timestep t to t - k on a grid of ``solver_steps`` timesteps (k = T / solver_steps), at
``guidance_scale``. The student (the same UNet with adapters) learns the consistency function
f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t): its value at (z_t, t) must equal the adapters' own value, without
gradient, at the teacher's (z_{t-k}, t - k), under a pseudo-Huber distance. c_skip / c_out are LCM's boundary
scalings (``timestep_scaling`` 10, sigma_data 0.5), the very ones the ``lcm`` sampler uses, on the grid its
``lcm`` schedule samples (50 steps), so the adapters load through the ordinary LoRA path (``--lora``) and
sample with ``sampler=lcm`` at guidance 1: the teacher's guidance is baked in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ldm.models.diffusion import schedule as sched
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.frozen_base import load_frozen_base
from ldm.models.diffusion.sampling.consistency import boundary_scalings
from ldm.util import ConfigError

# Every linear / convolution of the attention blocks and the ResBlocks' convolutions and time projections
# (diffusers' LCM-LoRA targets the same layers under its own names).
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "in_layers.2", "out_layers.3", "emb_layers.1")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Mean of sqrt((a - b)^2 + c^2) - c: quadratic for differences below c, linear above (c = 0: L1). Computed as
    d^2 / (sqrt(d^2 + c^2) + c), the same value without the cancellation that loses small d in float32."""
    d2 = (a.float() - b.float()) ** 2
    return (d2 / ((d2 + c * c).sqrt() + c)).mean()


class LCMDistillation(LatentDiffusion):
    """LCM-LoRA adapters (``rank``, ``alpha``, on ``targets``) distilled from a frozen base model.

    ``config``/``ckpt``: the base model (both None: the bundled demo). ``guidance_scale``: the teacher's CFG scale
    (``uncond + g * (cond - uncond)``, the empty prompt as uncond). ``solver_steps``: the teacher's DDIM grid.
    ``huber_c``: the pseudo-Huber constant. ``export_dir``: where ``lcm-lora.safetensors`` goes at the end of
    training (default ``<run>/export``)."""

    def __init__(self, config: Optional[str] = None, ckpt: Optional[str] = None, guidance_scale: float = 3.0,
                 solver_steps: int = 50, huber_c: float = 0.001, timestep_scaling: float = 10.0, rank: int = 16,
                 alpha: Optional[float] = None, targets: Sequence[str] = LCM_LORA_TARGETS,
                 export_dir: Optional[str] = None) -> None:
        from ldm.lora import add_lora

        if guidance_scale < 1:
            raise ConfigError(f"LCM distillation: guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        if huber_c < 0:
            raise ConfigError(f"LCM distillation: huber_c must be >= 0, got {huber_c}")
        self.base_config, self.base_ckpt = load_frozen_base(self, config, ckpt, "LCM distillation")
        if self.num_timesteps % solver_steps or not 1 <= solver_steps <= self.num_timesteps:
            raise ConfigError(f"LCM distillation: solver_steps must divide the base model's {self.num_timesteps} "
                              f"timesteps, got {solver_steps} (50, as the lcm sampler's grid, is the usual choice)")
        if self.model.conditioning_key != "crossattn" or self.cond_stage_model is None:
            raise ConfigError(f"LCM distillation: {self.base_config} is not a text-conditional (crossattn) model")
        self.guidance_scale, self.huber_c, self.timestep_scaling = float(guidance_scale), float(huber_c), timestep_scaling
        self.skip = self.num_timesteps // solver_steps
        # The DDIM grid the teacher steps on: k-1, 2k-1, ..., T-1 (the lcm sampler's timesteps come from it).
        self.register_buffer("solver_timesteps", torch.arange(self.skip - 1, self.num_timesteps, self.skip),
                             persistent=False)
        add_lora(self, rank=rank, alpha=alpha, unet_targets=list(targets))
        self.export_dir = export_dir

    def train(self, mode: bool = True) -> "LCMDistillation":
        super().train(mode)
        self.model.eval()  # frozen base: no dropout noise in teacher, student or target
        return self

    def _unet(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, adapters: bool) -> torch.Tensor:
        """The UNet's output, with the adapters as trained or (the teacher) switched off for this call."""
        from ldm.lora import set_lora_scale

        if adapters:
            return self.apply_model(z, t, context)
        set_lora_scale(self, 0.0)
        try:
            return self.apply_model(z, t, context)
        finally:
            set_lora_scale(self, 1.0)

    def consistency(self, z: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """f(z_t, t) = c_skip(t) z_t + c_out(t) x0, x0 implied by the network ``output`` at (z_t, t)."""
        x0, _ = sched.to_x0_eps(output, z, self.alphas_cumprod[t], self.parameterization)
        c_skip, c_out = boundary_scalings(t.float(), self.timestep_scaling)
        shape = (-1,) + (1,) * (z.dim() - 1)
        return c_skip.view(shape) * z + c_out.view(shape) * x0

    @torch.no_grad()
    def teacher_step(self, z: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, context: torch.Tensor,
                     null: torch.Tensor) -> torch.Tensor:
        """One DDIM step of the guided teacher (adapters off) from ``t`` to ``t_prev``."""
        out = self._unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([null, context]), adapters=False)
        a_t = self.alphas_cumprod[t]
        x0, eps = sched.to_x0_eps(out, torch.cat([z, z]), torch.cat([a_t, a_t]), self.parameterization)
        (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
        g = self.guidance_scale
        x0_g, eps_g = x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)
        a_prev = self.alphas_cumprod[t_prev].view(-1, *([1] * (z.dim() - 1)))
        return a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g

    def distillation_loss(self, z0: torch.Tensor, context: torch.Tensor, null: torch.Tensor,
                          noise: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None):
        """The consistency-distillation loss of clean latents ``z0`` under ``context`` (``null``: the unconditional
        context, broadcastable to it); ``index`` picks each sample's grid timestep (default: uniform)."""
        b = z0.shape[0]
        if index is None:
            index = torch.randint(0, len(self.solver_timesteps), (b,), device=z0.device)
        t = self.solver_timesteps[index]
        t_prev = (t - self.skip).clamp(min=0)
        noise = torch.randn_like(z0) if noise is None else noise
        z_t = sched.q_sample(z0, self.alphas_cumprod[t], noise)
        null = null.expand_as(context)
        z_prev = self.teacher_step(z_t, t, t_prev, context, null)
        with torch.no_grad():
            target = self.consistency(z_prev, t_prev, self._unet(z_prev, t_prev, context, adapters=True))
        prediction = self.consistency(z_t, t, self._unet(z_t, t, context, adapters=True))
        return pseudo_huber(prediction, target, self.huber_c)

    def shared_step(self, batch: dict, **kwargs: Any):
        z, context = self.get_input(batch, self.first_stage_key)
        loss = self.distillation_loss(z, context, self._null_context("")[None])
        prefix = "train" if self.training else "val"
        return loss, {f"{prefix}/loss": loss, f"{prefix}/loss_lcd": loss}

    def export(self, folder: Path, step: Optional[int] = None) -> Path:
        """Write the adapters as ``lcm-lora.safetensors`` (kohya keys, what ``--lora`` and diffusers read)."""
        from ldm.lora import save_lora

        meta = {"ldm_lcm_guidance_scale": f"{self.guidance_scale:g}", "ldm_lcm_solver_steps": str(
            self.num_timesteps // self.skip), "ldm_base_model": Path(self.base_ckpt).name}
        if step is not None:
            meta["ss_steps"] = str(step)
        return save_lora(self, Path(folder) / "lcm-lora.safetensors", metadata=meta)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = Path(self.export_dir) if self.export_dir else Path(self.trainer.default_root_dir) / "export"
            print(f"LCM distillation: wrote {self.export(folder, step=int(self.global_step))}")
