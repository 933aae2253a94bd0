"""Plain-Python image generation over the sampling core: what the scripts wrap.

    images = generate(model, ["a photo of a cat"], seeds=[42], sampler="dpmpp_2m", steps=20)

Returns float images in [0, 1], ``[B, 3, H, W]``. Handles text-to-image, SDEdit image-to-image
(``init_image`` + ``strength``) and inpainting (``mask``: 1 = repaint), for 9-channel inpainting
models through their extra input channels and for ordinary models by latent mask blending.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.sampling.approx import Approximations
from ldm.models.vae_tiling import tiled_decode, tiled_encode
from ldm.modules.encoders.prompt_weights import prompt_weighting
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.offload import execution_device
from ldm.progress import RunProgress
from ldm.settings import PRECISIONS, SamplingSettings, validate

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_for_inference(model: torch.nn.Module, precision: str = "fp32", compile: bool = False,
                          half_vae: bool = False, channels_last: Optional[bool] = None) -> torch.nn.Module:
    """Put a loaded model in its sampling form, in place; returns ``model``.

    ``bf16`` / ``fp16`` store the UNet and the text encoder in that dtype (native low-precision
    kernels: on CPUs with bf16 instructions this is much faster than autocast over fp32 weights);
    the autoencoder follows under bf16 and stays fp32 under fp16, whose range its decoder overflows
    (``half_vae=True``: it follows under fp16 too, for a VAE fixed for fp16 such as sdxl-vae-fp16-fix).
    ``fp32`` and ``autocast`` keep fp32 weights. ``compile`` runs the UNet through ``torch.compile``
    with inductor's weight freezing, which pre-packs the weights for the CPU kernels (it sets
    ``torch._inductor.config.freezing`` for the process; inference only: later changes to the
    weights, e.g. merging a LoRA, are not seen by the compiled UNet). The first call pays the
    compilation, about a minute on 2 CPU cores, and each new image size compiles again. The compiled kernels
    are cached in ``$TORCHINDUCTOR_CACHE_DIR``, by default ``~/.cache/ldm/torchinductor`` (kept across
    reboots, unlike inductor's own default under /tmp): a later process compiling the same UNet at the same
    size reuses them (measured on 2 CPU cores, SD 1.x UNet at 64x64 latents: 106 s first, 62 s after; the
    frozen, pre-packed weights cannot be cached, so graph tracing and weight packing are paid again).

    ``channels_last`` stores the UNet's and the autoencoder's convolution weights channels-last, so activations
    stay in that layout from the first convolution on: no layout conversions around the attention blocks, and
    the CPU's (oneDNN) and GPU's (tensor core) convolution kernels run without reorders. Default (None): on for
    bf16 / fp16 / autocast, whose bf16 convolutions on NCHW tensors pay oneDNN's reorders into and out of its
    blocked layout on every call; under fp32 on a CPU, for the autoencoder only (SD 1.x on 2 cores: its decode
    1.12x faster channels-last, the fp32 UNet no faster and left NCHW, bit-identical to diffusers').
    """
    check_precision(precision)
    dtype = LOW_PRECISION.get(precision)
    unet_cl = vae_cl = channels_last
    if channels_last is None:
        unet_cl = dtype is not None or precision == "autocast"
        vae_cl = unet_cl or execution_device(model).type == "cpu"
    model.model.to(memory_format=torch.channels_last if unet_cl else torch.contiguous_format)
    if isinstance(getattr(model, "first_stage_model", None), torch.nn.Module):
        # At full resolution an NCHW convolution pays oneDNN's reorders to and from its blocked layout on every
        # call. SD 1.x decode of 4 latents at 512x512 on 2 cores: bf16 autocast 24.1 s NCHW, 9.3 s channels-last;
        # fp32 44.8 s and 39.2 s.
        model.first_stage_model.to(memory_format=torch.channels_last if vae_cl else torch.contiguous_format)
    if dtype is not None:
        model.model.to(dtype)
        for encoder in model.conditioner.text_encoders() if hasattr(model, "conditioner") else []:
            encoder.to(dtype)
        if precision == "bf16" or half_vae:
            model.first_stage_model.to(dtype)
    if compile:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True  # an options={} dict does not reach the freezing pass
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # Importing inductor already sets the variable to its /tmp default: only a user's own choice is kept.
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
        model.model.diffusion_model.compile()
    return model


def compile_cache_dir() -> Path:
    """Where ``compile=True`` keeps inductor's kernel cache unless ``TORCHINDUCTOR_CACHE_DIR`` is set."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldm" / "torchinductor"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def precision_context(precision: str, device: torch.device, weights_dtype: Optional[torch.dtype] = None):
    """Autocast for the chosen precision ('autocast' = fp16 on CUDA, bf16 on CPU).

    Nothing to do when the weights are already stored in the requested dtype
    (:func:`prepare_for_inference`): the modules cast their inputs themselves.
    """
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "autocast":
        precision = "fp16" if device.type == "cuda" else "bf16"
    dtype = LOW_PRECISION[precision]
    if weights_dtype == dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def latent_factor(model: torch.nn.Module) -> int:
    """Pixels per latent pixel of the first stage (8 for Stable Diffusion)."""
    first = model.first_stage_model
    return int(getattr(first, "downsample_factor", 2 ** (len(first.encoder.down) - 1)))


def decode_memory_estimate(height: int, width: int, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4),
                           bytes_per_value: int = 4) -> int:
    """Rough peak bytes of one VAE decode at ``height`` x ``width``: the widest full-resolution feature
    maps (the upsampled second level enters full resolution at ``ch * ch_mult[1]`` channels), ~3 alive."""
    widest = ch * max(ch_mult[:2])
    return 3 * height * width * widest * bytes_per_value


def available_memory(device: Union[str, torch.device]) -> Optional[int]:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: the OS's MemAvailable), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _decoder_shape(model: torch.nn.Module) -> dict[str, Any]:
    """``ch`` / ``ch_mult`` of the model's VAE decoder, for :func:`decode_memory_estimate` ({}: the SD VAE's)."""
    decoder = getattr(getattr(model, "first_stage_model", None), "decoder", None)
    ups = getattr(decoder, "up", None)
    if decoder is None or ups is None or not hasattr(decoder, "ch"):
        return {}
    return {"ch": decoder.ch, "ch_mult": [up.block[-1].out_channels // decoder.ch for up in ups]}


def memory_batch_size(model: torch.nn.Module, n: int, options: SamplingSettings) -> int:
    """Images per batch when ``batch_size`` is not set: all ``n``, or as many as leave the batch's VAE decode (its
    peak, see :func:`decode_memory_estimate`, per image, or per tile with ``vae_tiling``) within 70% of the memory
    free on the model's device (CUDA: free device memory; CPU: MemAvailable); at least 1. With ``vae_slicing``
    the decode holds one image whatever the batch, so all ``n``."""
    if n <= 1 or options.vae_slicing or options.height is None or options.width is None:
        return max(n, 1)
    free = available_memory(execution_device(model))
    if free is None:
        return n
    side = 8 * options.vae_tile_size
    height, width = ((min(options.height, side), min(options.width, side)) if options.vae_tiling
                     else (options.height, options.width))
    first = getattr(model, "first_stage_model", None)
    weights = next(first.parameters(), None) if first is not None else None
    bytes_per_value = 2 if options.precision == "bf16" or (weights is not None and weights.element_size() == 2) else 4
    per_image = decode_memory_estimate(height, width, bytes_per_value=bytes_per_value, **_decoder_shape(model))
    return max(1, min(n, int(0.7 * free // per_image)))


def check_memory(height: int, width: int, device: Union[str, torch.device], **decoder: int) -> None:
    """Refuse a size whose decode alone would not fit in memory, with the estimate, instead of trying."""
    need, free = decode_memory_estimate(height, width, **decoder), available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{height}x{width} needs about {need / 2**30:.1f} GiB to decode, more than the "
                         f"{free / 2**30:.1f} GiB free on {device}; choose a smaller size or vae_tiling=true")


def _as_list(value: Union[str, Sequence[str]], n: int, name: str) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} prompts; give one, or one per prompt")
    return values


@torch.no_grad()
def encode_prompts(model: torch.nn.Module, prompts: Sequence[str], negative: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and negative-prompt contexts with the same number of 77-token windows (batched CFG needs it).
    An unconditional model (``cond_stage_config: __is_unconditional__``) ignores the prompts: (None, None)."""
    if getattr(model, "cond_stage_model", True) is None:
        return None, None
    if getattr(model, "cond_stage_key", None) in ("class_label", "cls"):
        key = getattr(model.cond_stage_model, "key", model.cond_stage_key)
        raise ValueError(f"this model is class-conditional (cond_stage_key {model.cond_stage_key!r}), not text-conditional; "
                         f"sample it with model.sample_log(cond=model.get_learned_conditioning({{{key!r}: labels}}), "
                         "batch_size=len(labels), ddim=True, ddim_steps=50)")
    texts = [*prompts, *negative]
    unique = list(dict.fromkeys(texts))  # n_samples copies of a prompt (and of its negative) are encoded once
    encoded = model.get_learned_conditioning(unique)
    if len(unique) < len(texts):
        encoded = (encoded[[unique.index(t) for t in texts]] if isinstance(encoded, torch.Tensor)
                   else model.get_learned_conditioning(texts))
    return encoded[: len(prompts)], encoded[len(prompts):]


def has_vector_conditioning(model: torch.nn.Module) -> bool:
    """Models whose conditioner is their own part (SDXL's DiffusionEngine): batches of prompts + micro-conditioning."""
    return "conditioner" in dict(model.named_children())


@torch.no_grad()
def encode_sdxl(model: torch.nn.Module, prompts: Sequence[str], negative: Sequence[str], options: SamplingSettings,
                height: int, width: int) -> tuple[dict, dict]:
    """SDXL conditioning dicts (crossattn + vector) of the prompts and of the negative side, as diffusers builds
    them: a prompt per text encoder, size/crop/aesthetic micro-conditioning, and (base models) zeros for an empty
    negative prompt."""
    n = len(prompts)
    device = execution_device(model)
    size = [height, width]
    original, target = list(options.original_size or size), list(options.target_size or size)
    crop = list(options.crops_coords_top_left)

    def batch(text: Sequence[str], text_2: Sequence[str], orig: list, crop_: list, targ: list, score: float) -> dict:
        def rows(values: list) -> torch.Tensor:
            return torch.tensor([values] * n, dtype=torch.float32, device=device)
        return {"txt": list(text), "txt_2": list(text_2), "original_size_as_tuple": rows(orig),
                "crop_coords_top_left": rows(crop_), "target_size_as_tuple": rows(targ), "aesthetic_score": rows([score])}

    prompts_2 = [options.prompt_2] * n if options.prompt_2 is not None else list(prompts)
    negative_2 = [options.negative_prompt_2] * n if options.negative_prompt_2 is not None else list(negative)
    cond_batch = batch(prompts, prompts_2, original, crop, target, options.aesthetic_score)
    if options.negative_original_size is not None and options.negative_target_size is not None:
        # diffusers' rule: the negative side gets its own sizes only when both are given (its crop then defaults to 0, 0)
        uncond_args = (list(options.negative_original_size), list(options.negative_crops_coords_top_left or [0, 0]),
                       list(options.negative_target_size), options.negative_aesthetic_score)
    else:
        uncond_args = (original, crop, target, options.negative_aesthetic_score)
    if getattr(model, "force_zeros_for_empty_prompt", False) and not any(negative) and not any(negative_2):
        return model.conditioner(cond_batch), model.conditioner(batch(prompts, prompts_2, *uncond_args), zero_keys=["txt"])
    uncond_batch = batch(negative, negative_2, *uncond_args)
    both = {k: v + uncond_batch[k] if isinstance(v, list) else torch.cat([v, uncond_batch[k]]) for k, v in cond_batch.items()}
    out = model.conditioner(both)  # one call: prompt and negative get the same number of token windows
    return {k: v[:n] for k, v in out.items()}, {k: v[n:] for k, v in out.items()}


@torch.no_grad()
def encode_image(model: torch.nn.Module, image: torch.Tensor, tile: Optional[int] = None) -> torch.Tensor:
    """Latent of images in [-1, 1] (posterior mean: deterministic, so runs are reproducible); ``tile``
    (latent pixels) encodes in overlapping tiles."""
    if tile is None:
        posterior = model.encode_first_stage(image)
    else:
        first = model.first_stage_model
        image = image.to(next(first.parameters()).dtype)
        posterior = tiled_encode(first, image, latent_factor(model), tile, tile // 4)
    latents = posterior.mode() if isinstance(posterior, DiagonalGaussianDistribution) else posterior  # VQ: a tensor
    return model.scale_factor * latents


@torch.no_grad()
def decode_latents(model: torch.nn.Module, latents: torch.Tensor, tile: Optional[int] = None,
                   slicing: bool = False) -> torch.Tensor:
    """Images in [-1, 1] of ``latents``: whole, in overlapping tiles of ``tile`` latent pixels, and/or (``slicing``)
    one image of the batch at a time."""
    if slicing and latents.shape[0] > 1:
        return torch.cat([decode_latents(model, z[None], tile) for z in latents])
    if tile is not None:
        return tiled_decode(model.decode_first_stage, latents, latent_factor(model), tile, tile // 4)
    return model.decode_first_stage(latents)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[str],
    settings: Optional[SamplingSettings] = None,
    *,
    seeds: Sequence[int],
    init_image: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[dict], None]] = None,
    progress: Union[bool, RunProgress] = True,
    refiner: Optional[torch.nn.Module] = None,
    depth_map: Optional[torch.Tensor] = None,
    **changes: Any,
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] for ``prompts`` (one seed per prompt).

    ``settings`` (:class:`ldm.settings.SamplingSettings`: sampler, steps, guidance, size, strength,
    precision, ...) with ``changes`` applied by name — ``generate(model, p, seeds=[1], steps=20)`` —
    a misspelled name is an error. ``negative_prompt`` may also be a list, one per prompt.

    ``refiner`` (an SDXL refiner, sharing nothing with ``model`` but the latent space) finishes each image:
    as an ensemble of experts taking over at ``refiner_switch`` of the schedule, or, with ``refiner_strength``,
    as img2img on the base's finished latents.

    SD 2 depth models (:mod:`ldm.depth2img`) see the depth of ``init_image``, or ``depth_map`` ``[B or 1, 1, h, w]``.

    Images go through the text encoder, the UNet (CFG doubled) and the VAE together, ``batch_size`` at a time
    (default: all of them), each starting from its own seed's noise. Prompts whose contexts have different
    numbers of 77-token windows never share a batch (padding would change the shorter one's attention), so
    an image computed in a batch equals the same image computed alone up to the kernels' rounding, which
    depends on the batch size. ``batch_invariant=True`` computes each image on its own: bit for bit the same
    whatever else was asked for, at the cost of speed.

    ``progress``: a bar over all steps of all batches (or a :class:`ldm.progress.RunProgress` to advance).
    """
    prompts = list(prompts)
    negative = changes.pop("negative_prompt", None)
    try:
        options = dataclasses.replace(settings or SamplingSettings(), **changes)
    except TypeError:
        known = [f.name for f in dataclasses.fields(SamplingSettings)]
        unknown = sorted(set(changes) - set(known))
        raise TypeError(f"generate() has no setting {', '.join(map(repr, unknown))}; "
                        f"settings are {', '.join(known)}") from None
    negative = options.negative_prompt if negative is None else negative
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per image")
    if options.height is None or options.width is None:
        raise ValueError("height and width are needed")
    validate({k: v for k, v in dataclasses.asdict(options).items() if k != "negative_prompt"})
    negative = _as_list(negative, len(prompts), "negative_prompt")
    batches = batch_plan(model, prompts, negative, options)
    bar = progress if isinstance(progress, RunProgress) else RunProgress(len(batches), options.steps, bool(progress))
    kwargs = dict(sampler=options.sampler, steps=options.steps, guidance_scale=options.guidance_scale,
                  guidance_rescale=options.guidance_rescale, eta=options.eta, discretization=options.discretization,
                  height=options.height, width=options.width, strength=options.strength, precision=options.precision,
                  callback=bar.callback(callback), progress=False, options=options, refiner=refiner)
    images: list[Optional[torch.Tensor]] = [None] * len(prompts)
    try:
        for rows in batches:
            def pick(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return x[rows] if x is not None and x.dim() == 4 and x.shape[0] > 1 else x
            with prompt_weighting([model, refiner], options.prompt_weighting):
                out = _generate_batch(model, [prompts[i] for i in rows], [negative[i] for i in rows],
                                      [seeds[i] for i in rows], pick(init_image), pick(mask), depth_map=pick(depth_map),
                                      **kwargs)
            for i, image in zip(rows, out):
                images[i] = image
            bar.batch_done()
    finally:
        if bar is not progress:
            bar.close()
    return torch.stack(images)


def batch_plan(model: torch.nn.Module, prompts: Sequence[str], negative: Sequence[str],
               options: SamplingSettings) -> list[list[int]]:
    """Which images run together: each alone (``batch_invariant``), else groups of equal context length
    (number of 77-token windows of prompt and negative prompt), in order, ``batch_size`` at a time."""
    n = len(prompts)
    if options.batch_invariant or n == 1:
        return [[i] for i in range(n)]
    windows = context_windows(model, [*prompts, *negative], options.prompt_weighting)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(max(windows[i], windows[n + i]), []).append(i)
    size = options.batch_size or memory_batch_size(model, n, options)
    return [rows[k : k + size] for rows in groups.values() for k in range(0, len(rows), size)]


def context_windows(model: torch.nn.Module, texts: Sequence[str], weighting: bool = False) -> list[int]:
    """Number of 77-token windows each text needs (the most over the model's text encoders; 1 without any);
    ``weighting``: as read with prompt weighting (BREAK starts a window)."""
    encoders = [getattr(model, "cond_stage_model", None)]
    conditioner = dict(model.named_children()).get("conditioner")
    encoders += list(getattr(conditioner, "embedders", []))
    counts = [1] * len(texts)
    with prompt_weighting(model, weighting):
        for encoder in encoders:
            if encoder is not None and callable(getattr(encoder, "chunked_tokens", None)):
                for i, text in enumerate(texts):
                    counts[i] = max(counts[i], int(encoder.chunked_tokens([text]).shape[1]))
    return counts


def _generate_batch(model, prompts: list[str], negative: list[str], seeds: list[int], init_image, mask, *, sampler, steps,
                    guidance_scale, guidance_rescale, eta, discretization, height, width, strength, precision, callback,
                    progress, options: SamplingSettings, refiner: Optional[torch.nn.Module] = None,
                    depth_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    if hasattr(model, "low_scale_model"):  # SD 2 x4 upscaler: init_image is the low-res input (ldm.upscale)
        from ldm.upscale import upscale_batch

        if mask is not None or refiner is not None:
            raise ValueError("an upscaler takes neither a mask nor a refiner; upscale the finished image instead")
        return upscale_batch(model, prompts, negative, seeds, init_image, options, callback, progress)
    weights = next(model.model.parameters())
    device = execution_device(model)
    f = latent_factor(model)
    tile = options.vae_tile_size if options.vae_tiling else None
    shape = (model.channels, height // f, width // f)

    with precision_context(precision, device, weights.dtype):
        if has_vector_conditioning(model):
            cond, uncond = encode_sdxl(model, prompts, negative, options, height, width)
        else:
            cond, uncond = encode_prompts(model, prompts, negative)
        init_latent = keep = None
        if init_image is not None:
            init_image = _fit(init_image, len(prompts), height, width, "init image").to(device)
            init_latent = encode_image(model, init_image, tile).float()
        source_latent = init_latent
        if mask is not None:
            if init_image is None:
                raise ValueError("inpainting needs init_image as well as mask")
            mask = _fit(mask, len(prompts), height, width, "mask").to(device).clamp(0, 1)
            mask = (mask > 0.5).float()
        if depth_map is not None or hasattr(model, "depth_model"):  # SD 2 depth: a fifth UNet channel (ldm.depth2img)
            from ldm.depth2img import depth_cond

            cond, uncond = depth_cond(model, cond, uncond, init_image, depth_map, shape[1:])
        masked_image = _masked_image_embedder(model)
        if masked_image is not None:  # 9-channel inpainting model
            # Without a mask it repaints everything: text-to-image, or SDEdit from init_image.
            repaint = mask if mask is not None else torch.ones(len(prompts), 1, height, width, device=device)
            source = init_image if init_image is not None else torch.zeros(len(prompts), 3, height, width, device=device)
            inputs = {key: repaint for key in masked_image.input_keys}
            inputs[masked_image.masked_image_key] = source * (1 - repaint)
            c_cat = model.conditioner(inputs, kinds=["concat"])["concat"].float()
            cond = {"c_concat": [c_cat], "c_crossattn": [cond]}
            uncond = {"c_concat": [c_cat], "c_crossattn": [uncond]}
            if mask is not None:
                init_latent = None  # the model sees the image through its extra channels
        elif mask is not None:
            keep = 1 - F.interpolate(mask, size=shape[1:], mode="nearest")
        ensemble = refiner is not None and options.refiner_strength is None
        latents = sample(
            model, cond, uncond=uncond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            sampler=sampler, steps=steps, shape=shape, seeds=seeds, eta=eta, discretization=discretization,
            init_latent=init_latent, strength=strength if keep is None else 1.0, keep_mask=keep,
            callback=callback, progress=progress, denoising_end=options.refiner_switch if ensemble else None,
            approx=Approximations.from_settings(options),
        )
    if refiner is not None:
        model = refiner
        weights = next(model.model.parameters())
        # An ordinary (4-channel) refiner keeps the unmasked region by latent blending, whatever the base was.
        refine_keep = None if mask is None else 1 - F.interpolate(mask, size=shape[1:], mode="nearest")
        with precision_context(precision, device, weights.dtype):
            cond, uncond = encode_sdxl(model, prompts, negative, options, height, width)
            common = dict(uncond=uncond, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                          sampler=sampler, steps=steps, shape=shape, seeds=seeds, eta=eta,
                          discretization=discretization, callback=callback, progress=progress, keep_mask=refine_keep,
                          approx=Approximations.from_settings(options))
            if ensemble:
                latents = sample(model, cond, denoising_start=options.refiner_switch, noisy_latent=latents,
                                 init_latent=source_latent, **common)
            else:  # img2img on the finished latents; in the kept region they equal the source already
                latents = sample(model, cond, init_latent=latents if refine_keep is None else source_latent,
                                 strength=options.refiner_strength, start_latent=latents, **common)
    # fp16 VAE decoding overflows; decode in full precision unless bf16 was asked for, directly or as autocast off
    # CUDA (bf16 keeps fp32's range), or the VAE is stored in fp16 (a VAE fixed for it).
    first_dtype = next(model.first_stage_model.parameters()).dtype
    bf16 = precision == "bf16" or (precision == "autocast" and device.type != "cuda")
    with precision_context("bf16" if bf16 else "fp32", device, first_dtype):
        images = decode_latents(model, latents, tile, options.vae_slicing)
    return ((images.float() + 1) / 2).clamp(0, 1)


def _masked_image_embedder(model: torch.nn.Module):
    """The conditioner's mask + masked-image embedder of an inpainting model, or None."""
    from ldm.modules.encoders.conditioner import MaskedImageEmbedder

    conditioner = getattr(model, "conditioner", None)
    found = [e for e in getattr(conditioner, "embedders", []) if isinstance(e, MaskedImageEmbedder)]
    return found[0] if found else None


def _fit(x: torch.Tensor, n: int, height: int, width: int, what: str) -> torch.Tensor:
    if x.dim() == 3:
        x = x[None]
    if x.shape[-2:] != (height, width):
        raise ValueError(f"{what} is {x.shape[-1]}x{x.shape[-2]} but the output is {width}x{height}; resize it or pass --W/--H to match")
    if x.shape[0] == 1 and n > 1:
        x = x.expand(n, *x.shape[1:])
    return x.float()
