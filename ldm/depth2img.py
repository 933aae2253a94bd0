"""SD 2 depth-to-image over the generation API: what ``generate`` adds for a ``LatentDepth2ImageDiffusion``.

    images = depth2img(model, ["a marble statue"], image, seeds=[42], strength=0.8, steps=50)
    images = depth2img(model, ["a marble statue"], image, seeds=[42], depth_map=depth)   # a depth map of your own

``image`` is ``[B or 1, 3, H, W]`` in [-1, 1]; the result ``[B, 3, H, W]`` in [0, 1]. It runs as img2img
(``strength``: how far from the image to go; 1 ignores its pixels and keeps only its depth) with one more
UNet input channel: the depth of the image, estimated by the model's MiDaS stage (or ``depth_map``,
``[B or 1, 1, h, w]``, larger = nearer, any size), resized to the latent size (bicubic) and normalised per image
to [-1, 1] by its min and max, as SD 2's sampling scripts and diffusers' ``StableDiffusionDepth2ImgPipeline`` do.
The negative side sees the same depth; only the text changes. Randomness is img2img's: the image's latent is the
posterior mean, the noise comes from each image's seed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ldm.settings import SamplingSettings


def is_depth_model(model: torch.nn.Module) -> bool:
    """A model with a MiDaS depth stage (SD 2's ``LatentDepth2ImageDiffusion``)."""
    from ldm.modules.midas.api import MiDaSInference

    return isinstance(getattr(model, "depth_model", None), MiDaSInference)


def depth_cond(model: torch.nn.Module, cond: Any, uncond: Any, image: Optional[torch.Tensor],
               depth_map: Optional[torch.Tensor], latent_size: Sequence[int]) -> tuple[dict, dict]:
    """``generate``'s conditioning for a depth model: the text contexts plus the depth channel, the same on both
    sides of classifier-free guidance."""
    if not is_depth_model(model):
        raise ValueError(f"depth_map needs a depth-to-image model (configs/stable-diffusion/v2-midas-inference.yaml); "
                         f"{type(model).__name__} has no depth stage")
    n = cond.shape[0] if isinstance(cond, torch.Tensor) else len(cond)
    c_cat = depth_concat(model, image, depth_map, latent_size, n)
    return {"c_concat": [c_cat], "c_crossattn": [cond]}, {"c_concat": [c_cat], "c_crossattn": [uncond]}


@torch.no_grad()
def depth_concat(model: torch.nn.Module, image: Optional[torch.Tensor], depth_map: Optional[torch.Tensor],
                 latent_size: Sequence[int], n: int) -> torch.Tensor:
    """The depth channel ``[n, 1, h, w]`` (latent size, [-1, 1]) for ``n`` images: of ``depth_map`` if given,
    else estimated from ``image`` (in [-1, 1])."""
    if depth_map is None:
        if image is None:
            raise ValueError("a depth model needs an init image (its depth is estimated) or a depth map")
        shared = image.dim() == 4 and image.shape[0] > 1 and image.stride(0) == 0  # one image, expanded
        depth = model.estimate_depth(image[:1] if shared else image)
    else:
        depth = depth_map[None] if depth_map.dim() == 3 else depth_map
        if depth.dim() != 4 or depth.shape[1] != 1:
            raise ValueError(f"a depth map is [B, 1, h, w] (or [1, h, w]), got {list(depth_map.shape)}")
    cond = model.depth_conditioning(depth.to(next(model.model.parameters()).device), latent_size)
    if cond.shape[0] == 1 and n > 1:
        cond = cond.expand(n, -1, -1, -1)
    if cond.shape[0] != n:
        raise ValueError(f"got {cond.shape[0]} depth maps for {n} images; give one, or one per image")
    return cond


@torch.no_grad()
def depth2img(model: torch.nn.Module, prompts: Sequence[str], image: Optional[torch.Tensor],
              settings: Optional[SamplingSettings] = None, *, seeds: Sequence[int],
              depth_map: Optional[torch.Tensor] = None, callback: Optional[Callable[[dict], None]] = None,
              progress: bool = True, **changes: Any) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] of ``image`` guided by ``prompts`` and its depth (see the module doc).

    ``settings`` and ``changes`` as for :func:`ldm.generation.generate` (``strength``, ``steps``, ``guidance_scale``,
    ``sampler``, ...); the output has the image's size. Without ``image`` (``depth_map`` only) it generates from
    noise at ``height`` x ``width``."""
    from ldm.generation import generate

    if not is_depth_model(model):
        raise ValueError(f"{type(model).__name__} is not a depth-to-image model; load "
                         "configs/stable-diffusion/v2-midas-inference.yaml with its checkpoint")
    options = settings or SamplingSettings()
    if image is not None:
        image = image[None] if image.dim() == 3 else image
        options = dataclasses.replace(options, height=image.shape[-2], width=image.shape[-1])
    return generate(model, prompts, options, seeds=seeds, init_image=image, depth_map=depth_map, callback=callback,
                    progress=progress, **changes)


def read_depth_map(path: Union[str, Path]) -> torch.Tensor:
    """A depth map image as ``[1, 1, h, w]`` in [0, 1] (white = near, as MiDaS' inverse depth; colour images are
    read as grey; 16-bit and float greys keep their precision)."""
    from ldm.image_io import open_image

    img = open_image(path, "depth map")
    deep = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
    white = deep.get(img.mode)
    if white is None:
        img, white = img.convert("L"), 255.0
    values = np.asarray(img, dtype=np.float32) / white
    if not np.isfinite(values).all():
        raise ValueError(f"depth map {str(path)!r} holds NaN or infinite values")
    return torch.from_numpy(np.clip(values, 0.0, 1.0).copy())[None, None]


def check_depth_weights(model: torch.nn.Module) -> None:
    """Refuse, in one line naming ``midas_weights``, a depth model that cannot estimate depth (loaded from a
    checkpoint without MiDaS weights)."""
    from ldm.modules.midas.api import NO_WEIGHTS

    if is_depth_model(model) and not model.depth_model.has_weights:
        raise ValueError(NO_WEIGHTS)


def is_depth_config(model_config: Any) -> bool:
    """Whether a model config (its ``model`` node) builds a depth-to-image model."""
    from ldm.models.diffusion.ddpm import LatentDepth2ImageDiffusion
    from ldm.util import get_obj_from_str

    cls = get_obj_from_str(str(model_config["target"]))
    return isinstance(cls, type) and issubclass(cls, LatentDepth2ImageDiffusion)


def with_midas_weights(model_config: Any, path: str) -> Any:
    """A copy of a depth model's config whose depth stage loads the MiDaS weights file ``path``."""
    from omegaconf import OmegaConf

    node = OmegaConf.create(OmegaConf.to_container(model_config))
    stage = node.params.depth_stage_config
    if stage.get("params") is None:
        stage.params = {}
    stage.params.midas_weights = str(path)
    return node
