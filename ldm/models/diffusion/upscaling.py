"""``LatentUpscaleDiffusion``: SD 2's x4 upscaler (re-exported as ``ldm.models.diffusion.ddpm.LatentUpscaleDiffusion``).

A text-conditioned latent diffusion model whose UNet also sees the low-resolution image: the image,
noise-augmented by ``low_scale_model`` to a noise level, is concatenated to the latent (``c_concat``:
4 + 3 = 7 input channels) and the level is the UNet's class label (``c_adm``, ``num_classes: 1000``).
Its conditioning key is ``hybrid-adm``: the DiffusionWrapper routes concat, cross-attention and ``y``.
The first stage downsamples by 4, so the latent has the low-res image's size and decodes to 4x it.

Import it as ``ldm.models.diffusion.ddpm.LatentUpscaleDiffusion`` (upstream's path, what configs name):
ddpm resolves that name lazily, so either module may be imported first.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import disabled_train, images_to_bchw, instantiate_from_config


class LatentUpscaleDiffusion(LatentDiffusion):
    """Stability-AI/stablediffusion's upscaler: ``low_scale_config`` builds the low-res conditioning model
    (e.g. ``ImageConcatWithNoiseAugmentation``), ``low_scale_key`` names the low-res images of a batch and
    ``noise_level_key``, if set, the batch's per-sample noise levels (else they are drawn at random)."""

    def __init__(self, *args: Any, low_scale_config: dict, low_scale_key: str = "LR",
                 noise_level_key: Optional[str] = None, **kwargs: Any):
        ckpt_path = kwargs.pop("ckpt_path", None)  # loaded below, once the low-scale model exists
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentUpscaleDiffusion needs a frozen text encoder: set cond_stage_trainable: false")
        self.instantiate_low_stage(low_scale_config)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def instantiate_low_stage(self, config: dict) -> None:
        model = instantiate_from_config(config).eval()
        model.train = disabled_train.__get__(model)
        for p in model.parameters():
            p.requires_grad = False
        self.low_scale_model = model

    @property
    def max_noise_level(self) -> int:
        return int(getattr(self.low_scale_model, "max_noise_level", 0))

    @torch.no_grad()
    def upscale_conditioning(self, low_res: torch.Tensor, noise_level: Optional[torch.Tensor] = None,
                             noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the low-res images in [-1, 1], noise-augmented to ``noise_level`` [B], and the levels) for ``c_concat``
        and ``c_adm``. Without levels the low-scale model draws them (training); a model without noise augmentation
        (``SimpleImageConcat``) keeps the images and gives level 0."""
        low_res = low_res.to(self.device, torch.float32)
        if noise_level is None or self.max_noise_level == 0:  # drawn by the model (training), or no augmentation
            return self.low_scale_model(low_res)
        noise_level = noise_level.to(self.device).long()
        if noise is None:
            return self.low_scale_model(low_res, noise_level)
        return self.low_scale_model(low_res, noise_level, noise.to(low_res))

    def conditioning_dict(self, context: torch.Tensor, low_res: torch.Tensor, noise_level: torch.Tensor) -> dict:
        """The ``apply_model`` conditioning of already augmented images: concat, cross-attention, class label."""
        return {"c_concat": [low_res], "c_crossattn": [context], "c_adm": noise_level}

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, return_first_stage_outputs: bool = False, force_c_encode: bool = False,
                  cond_key: Optional[str] = None, return_original_cond: bool = False, bs: Optional[int] = None,
                  return_x: bool = False, log_mode: bool = False):
        """[z, conditioning dict, ...] (the CompVis order of ``LatentDiffusion.get_input``). ``log_mode`` returns
        upstream's tuple: z, c, x, xrec, xc, the low-res images, their augmented version and the noise levels."""
        if log_mode:
            return_first_stage_outputs = return_original_cond = True
        z, c, *rest = super().get_input(batch, k, return_first_stage_outputs=return_first_stage_outputs,
                                        force_c_encode=True, cond_key=cond_key,
                                        return_original_cond=return_original_cond, bs=bs, return_x=return_x)
        x_low = images_to_bchw(batch[self.low_scale_key])[:bs]
        levels = None
        if self.noise_level_key is not None:
            levels = torch.as_tensor(batch[self.noise_level_key])[:bs].long()
        zx, noise_level = self.upscale_conditioning(x_low, levels)
        cond = self.conditioning_dict(c, zx, noise_level)
        if log_mode:
            x, xrec, xc = rest[0], rest[1], rest[-1]
            return z, cond, x, xrec, xc, x_low, self.low_scale_model.decode(zx), noise_level
        return [z, cond, *rest]
