"""SD 2 x4 upscaling over the sampling core: what ``generate`` runs for a ``LatentUpscaleDiffusion``.

    images = upscale(model, ["a photo of a cat"], low_res, seeds=[42], noise_level=20, steps=50)

``low_res`` is ``[B, 3, h, w]`` in [-1, 1]; the result is ``[B, 3, 4h, 4w]`` in [0, 1]. The low-res
image is noise-augmented to ``noise_level`` (the model's ``low_scale_model``; a ``SimpleImageConcat``
model has no augmentation and ignores the level), concatenated to the
latent, and the level is the UNet's class label; the negative side keeps the same image and level
and only changes the text, as SD 2's scripts and diffusers' ``StableDiffusionUpscalePipeline`` do.

Randomness: image k draws, from a CPU generator seeded with its seed, first the low-res image's
augmentation noise and then the starting latent, in diffusers' order, so a seed gives the same
starting point as diffusers with ``generator=torch.Generator().manual_seed(seed)``. Stochastic
samplers take their step noise from a second generator whose seed is derived from the image's.

Tiling (``upscale_tile_size``, in low-res pixels = latent pixels): a latent larger than the tile is
denoised in overlapping tiles blended in latent space at every step (:mod:`...sampling.tiled`);
decoding the 4x result in tiles is the separate ``vae_tiling`` option.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ldm.generation import decode_latents, encode_prompts, generate, latent_factor, precision_context
from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.sampling.tiled import TiledDenoiser
from ldm.offload import execution_device
from ldm.settings import SamplingSettings


def is_upscaler(model: torch.nn.Module) -> bool:
    """A model with a low-res conditioning stage (SD 2's ``LatentUpscaleDiffusion``)."""
    return isinstance(getattr(model, "low_scale_model", None), torch.nn.Module)


def upscaler_config(model_config: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """(output / input size, max_noise_level) of an upscaler's model config (level 0: no noise augmentation);
    None for other models."""
    import inspect

    from ldm.models.diffusion.ddpm import LatentUpscaleDiffusion
    from ldm.util import get_obj_from_str

    cls = get_obj_from_str(str(model_config["target"]))
    if not (isinstance(cls, type) and issubclass(cls, LatentUpscaleDiffusion)):
        return None
    params = model_config["params"]
    ddconfig = params["first_stage_config"]["params"]["ddconfig"]
    low_scale = params["low_scale_config"]
    option = inspect.signature(get_obj_from_str(str(low_scale["target"]))).parameters.get("max_noise_level")
    max_level = (low_scale.get("params") or {}).get("max_noise_level", option.default if option else 0)
    return 2 ** (len(ddconfig["ch_mult"]) - 1), int(max_level)


def step_noise_seed(seed: int) -> int:
    """The seed of an image's step-noise generator (stochastic samplers): a fixed function of its seed that
    does not replay the stream its starting noise came from."""
    return int.from_bytes(hashlib.sha256(f"ldm-upscale-steps:{int(seed)}".encode()).digest()[:4], "little")


def initial_noise(seeds: Sequence[int], low_res_shape: Sequence[int], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(augmentation noise [B, 3, h, w], starting latent [B, C, h, w]): per image, from one CPU generator."""
    augment, start = [], []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(int(seed))
        augment.append(torch.randn((1, *low_res_shape), generator=g))
        start.append(torch.randn((1, channels, *low_res_shape[1:]), generator=g))
    return torch.cat(augment), torch.cat(start)


@torch.no_grad()
def upscale(model: torch.nn.Module, prompts: Sequence[str], low_res: torch.Tensor,
            settings: Optional[SamplingSettings] = None, *, seeds: Sequence[int],
            callback: Optional[Callable[[dict], None]] = None, progress: bool = True, **changes: Any) -> torch.Tensor:
    """Images ``[B, 3, f*h, f*w]`` in [0, 1] (f = 4 for SD 2) of ``low_res`` ``[B or 1, 3, h, w]`` in [-1, 1].

    ``settings`` and ``changes`` as for :func:`ldm.generation.generate` (``noise_level``, ``upscale_tile_size``,
    ``steps``, ``guidance_scale``, ``sampler``, ...); the output size follows the input."""
    if not is_upscaler(model):
        raise ValueError(f"{type(model).__name__} is not an upscaler; load configs/stable-diffusion/x4-upscaling.yaml "
                         "with its checkpoint")
    low_res = low_res[None] if low_res.dim() == 3 else low_res
    f = latent_factor(model)
    size = {"height": low_res.shape[-2] * f, "width": low_res.shape[-1] * f}
    options = dataclasses.replace(settings or SamplingSettings(), **size)
    return generate(model, prompts, options, seeds=seeds, init_image=low_res, callback=callback, progress=progress,
                    **changes)


def upscale_batch(model: torch.nn.Module, prompts: list[str], negative: list[str], seeds: list[int],
                  low_res: Optional[torch.Tensor], options: SamplingSettings,
                  callback: Optional[Callable[[dict], None]], progress: bool) -> torch.Tensor:
    """One batch of :func:`upscale` (``generate`` calls this for upscaler models; ``options`` are validated)."""
    if low_res is None:
        raise ValueError("an upscaler needs the low-res image: use scripts/upscale.py --init-img FILE "
                         "(in Python, ldm.upscale.upscale)")
    low_res = low_res[None] if low_res.dim() == 3 else low_res
    n, f = len(prompts), latent_factor(model)
    h, w = low_res.shape[-2:]
    if (options.height, options.width) != (h * f, w * f):
        raise ValueError(f"the {w}x{h} input upscales to {w * f}x{h * f}, not the asked {options.width}x{options.height};"
                         f" resize the input to {options.width // f}x{options.height // f} or leave --W/--H unset")
    if model.max_noise_level and not 0 <= options.noise_level <= model.max_noise_level:  # 0: no augmentation
        raise ValueError(f"noise_level must be in [0, {model.max_noise_level}] for this model, got {options.noise_level}")
    if low_res.shape[0] == 1 and n > 1:
        low_res = low_res.expand(n, -1, -1, -1)
    device = execution_device(model)
    augment, x_T = initial_noise(seeds, (3, h, w), model.channels)
    tile = options.upscale_tile_size
    denoiser = TiledDenoiser(model, tile) if tile else None
    weights = next(model.model.parameters())
    with precision_context(options.precision, device, weights.dtype):
        context, negative_context = encode_prompts(model, prompts, negative)
        levels = torch.full((n,), options.noise_level, dtype=torch.long, device=device)
        augmented, levels = model.upscale_conditioning(low_res.float(), levels, augment)
        cond = model.conditioning_dict(context, augmented, levels)
        uncond = model.conditioning_dict(negative_context, augmented, levels)
        latents = sample(model, cond, uncond=uncond, guidance_scale=options.guidance_scale,
                         guidance_rescale=options.guidance_rescale, sampler=options.sampler, steps=options.steps,
                         x_T=x_T, seeds=[step_noise_seed(s) for s in seeds], eta=options.eta,
                         discretization=options.discretization, callback=callback, progress=progress,
                         denoiser=denoiser)
    vae_tile = options.vae_tile_size if options.vae_tiling else None
    first_dtype = next(model.first_stage_model.parameters()).dtype
    with precision_context("bf16" if options.precision == "bf16" else "fp32", device, first_dtype):
        images = decode_latents(model, latents, vae_tile, options.vae_slicing)
    return ((images.float() + 1) / 2).clamp(0, 1)


def read_low_res(path: str, height: Optional[int], width: Optional[int], factor: int) -> tuple[torch.Tensor, int, int]:
    """(the input image ``[1, 3, h, w]`` in [-1, 1], output height, output width) for scripts/upscale.py.

    The output is ``factor`` times the input (a side of odd length loses its last pixel, so the output stays a
    multiple of 8), or ``height`` x ``width`` when given: the input is then resized to a ``factor``-th of it."""
    from ldm.image_io import image_to_tensor, open_image

    image = open_image(path, "input image")
    if (height is None) != (width is None):
        raise ValueError("give both --H and --W (the output size), or neither (4x the input)")
    even = (image.height // 2 * 2, image.width // 2 * 2)
    if min(even) == 0:
        raise ValueError(f"input image {str(Path(path))!r} is {image.width}x{image.height}; it needs at least 2x2 pixels")
    if height is not None and (height % factor or width % factor):
        raise ValueError(f"the output size must be a multiple of {factor} (it is {factor}x the input), got {width}x{height}")
    low = even if height is None else (height // factor, width // factor)
    if low == even:  # the input as it is (an odd side cropped by its last pixel): also what --regenerate finds
        return image_to_tensor(image)[..., :low[0], :low[1]].contiguous(), low[0] * factor, low[1] * factor
    return image_to_tensor(image, low), height, width
