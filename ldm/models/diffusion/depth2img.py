"""``LatentDepth2ImageDiffusion``: SD 2's depth-to-image model (re-exported as
``ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion``).

A text-conditioned latent diffusion model whose UNet also sees a depth map: the depth stage (``depth_model``,
MiDaS DPT-Hybrid, :class:`ldm.modules.midas.api.MiDaSInference`) estimates relative inverse depth from the
image, the map is resized to the latent size (bicubic) and normalised per image to [-1, 1], and it is
concatenated to the latent (``c_concat``: 4 + 1 = 5 UNet input channels; ``conditioning_key: hybrid``).

Import it as ``ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion`` (upstream's path, what configs name):
ddpm imports this module at its end, so importing this module before ddpm fails as a circular import.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.midas.api import MiDaSInference
from ldm.util import images_to_bchw, instantiate_from_config

# Upstream's training normalisation divides by (max - min + 0.001); its sampling scripts and diffusers by (max - min).
TRAINING_EPS = 1e-3


def normalize_depth(depth: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Each map of ``[B, 1, h, w]`` scaled to [-1, 1] by its own min and max (a flat map becomes -1)."""
    low = torch.amin(depth, dim=(1, 2, 3), keepdim=True)
    high = torch.amax(depth, dim=(1, 2, 3), keepdim=True)
    span = high - low + eps
    span = torch.where(span > 0, span, torch.ones_like(span))
    return 2.0 * (depth - low) / span - 1.0


class LatentDepth2ImageDiffusion(LatentDiffusion):
    """Stability-AI/stablediffusion's depth model: ``depth_stage_config`` builds the depth estimator, whose input
    is read from the batch under ``concat_keys[0]`` (``midas_in``: images prepared as SD 2's ``AddMiDaS`` does;
    when a batch lacks it, the model prepares them from the batch's images).

    ``finetune_keys`` (upstream: widen a 4-channel checkpoint's first convolution when fine-tuning from it) must
    be null, as SD 2's inference config sets it; ``keep_finetune_dims`` and ``c_concat_log_*`` are accepted for
    config compatibility and only matter with it.
    """

    def __init__(self, *args: Any, depth_stage_config: dict, concat_keys: Sequence[str] = ("midas_in",),
                 finetune_keys: Optional[Sequence[str]] = None, keep_finetune_dims: int = 4,
                 c_concat_log_start: Optional[int] = None, c_concat_log_end: Optional[int] = None, **kwargs: Any):
        if finetune_keys is not None:
            raise ValueError("finetune_keys (widening a 4-channel checkpoint's input convolution) is not supported; "
                             "set finetune_keys: null and load a depth checkpoint")
        if len(concat_keys) != 1:
            raise ValueError(f"LatentDepth2ImageDiffusion takes one concat key (the depth input), "
                             f"got {list(concat_keys)}")
        ckpt_path = kwargs.pop("ckpt_path", None)  # loaded below, once the depth stage exists
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ValueError("LatentDepth2ImageDiffusion needs a frozen text encoder: set cond_stage_trainable: false")
        if self.model.conditioning_key != "hybrid":
            raise ValueError(f"a depth model concatenates the depth map and cross-attends to text: conditioning_key "
                             f"must be hybrid, got {self.model.conditioning_key!r}")
        self.concat_keys = tuple(concat_keys)
        self.depth_stage_key = self.concat_keys[0]
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end
        self.depth_model = instantiate_from_config(depth_stage_config)
        if not isinstance(self.depth_model, MiDaSInference):
            raise ValueError("depth_stage_config must build ldm.modules.midas.api.MiDaSInference")
        for p in self.depth_model.parameters():
            p.requires_grad = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    @torch.no_grad()
    def estimate_depth(self, images: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth ``[B, 1, h, w]`` of images ``[B, 3, H, W]`` in [-1, 1], at the MiDaS input size,
        computed in float32 whatever the precision around it."""
        with torch.autocast(images.device.type, enabled=False):
            return self.depth_model.estimate(images.float())

    @staticmethod
    def depth_conditioning(depth: torch.Tensor, latent_size: Sequence[int], eps: float = 0.0) -> torch.Tensor:
        """``c_concat`` of depth maps ``[B, 1, h, w]``: bicubic to ``latent_size``, each normalised to [-1, 1]."""
        depth = F.interpolate(depth.float(), size=tuple(latent_size), mode="bicubic", align_corners=False)
        return normalize_depth(depth, eps)

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, **kwargs: Any):
        """[z, {"c_concat": [depth], "c_crossattn": [c]}, ...] (the CompVis order of ``LatentDiffusion.get_input``),
        the depth estimated from ``batch[concat_keys[0]]`` and normalised as upstream trains (eps 1e-3)."""
        z, c, *rest = super().get_input(batch, k, **kwargs)
        bs = kwargs.get("bs")
        if self.depth_stage_key in batch:
            midas_in = torch.as_tensor(batch[self.depth_stage_key])[:bs].to(self.device)
        else:
            midas_in = self.depth_model.transform(images_to_bchw(batch[k])[:bs].to(self.device))
        depth = self.depth_model(midas_in)
        c_cat = self.depth_conditioning(depth, z.shape[2:], TRAINING_EPS)
        return [z, {"c_concat": [c_cat], "c_crossattn": [c]}, *rest]
