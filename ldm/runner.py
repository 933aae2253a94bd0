"""Run a generation task from its settings: validate, load the model, generate, write the outputs.

This is what ``scripts/txt2img.py``, ``img2img.py`` and ``inpaint.py`` are made of; from Python:

    job = prepare(cfg, "txt2img", user_keys={"prompt", "steps"})   # validates; writes nothing
    result = execute(job)                                             # samples/, grid, config.yaml

Outputs: ``outdir/samples/NNNNN.png`` (numbering continues), ``outdir/grid-NNNN.png`` and
``outdir/config.yaml`` (the effective settings); every PNG records how to regenerate it.
"""
from __future__ import annotations

import contextlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig

from ldm import paths
from ldm import settings as declaration
from ldm.api import load_config, load_model
from ldm.cli_errors import check_overrides, guarded
from ldm.diffusers_folder import sha256_of
from ldm.files import atomic_write, sha256_file
from ldm.offload import enable_offload
from ldm.textual_inversion import load_embeddings, parse_spec, read_embedding, split_specs
from ldm.vae_file import replace_vae
from ldm.generation import batch_plan, check_memory, generate, prepare_for_inference
from ldm.depth2img import check_depth_weights, is_depth_config, read_depth_map, with_midas_weights
from ldm.modules.midas.api import check_weights_file
from ldm.lora import has_lora, load_lora, merge_lora, remove_lora
from ldm.progress import RunProgress
from ldm.models.diffusion.sampling.core import MAX_SEED
from ldm.image_io import image_to_tensor, make_grid, mask_to_tensor, open_image, read_metadata, save_png
from ldm.run_config import (TASKS, Settings, apply_model_defaults, apply_regeneration, build_metadata, check_outdir,
                            image_seeds, literal_settings, model_sampling_defaults, override_keys, read_prompts,
                            resolve_model, settings_yaml, translate_argv)

SAMPLE_PATTERN, GRID_PATTERN = r"(\d+)\.png", r"grid-(\d+)\.png"
CONFIG_DIR = paths.CONFIG_DIR


@dataclass
class Job:
    """A validated run: effective settings and every input, read."""

    task: str
    settings: Settings
    prompts: list[str]
    config: Path
    ckpt: Path
    model_sha256: str
    outdir: Path
    init_image: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    inputs: dict[str, Any] = field(default_factory=dict)  # input paths and hashes, for the metadata
    refiner: Optional[tuple[Path, Path]] = None  # (config, checkpoint) of an SDXL refiner
    depth_map: Optional[torch.Tensor] = None  # depth2img: the user's depth map, [1, 1, h, w]


@dataclass
class RunResult:
    samples: list[Path]
    grid: Optional[Path]
    config: Path


def prepare(cfg: Mapping[str, Any], task: str, user_keys: Iterable[str] = ()) -> Job:
    """Check ``cfg`` and read its inputs; one-line errors, nothing written.

    ``user_keys`` are the settings the user gave: the model config's ``sampling:`` defaults fill the others.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    cfg = literal_settings(cfg)  # plain values from here on: user text is never interpolated
    meta = None
    if cfg.get("regenerate"):
        meta = read_metadata(cfg.regenerate)
        if meta.get("script", task) != task:
            raise ValueError(f"{cfg.regenerate} was made by {meta['script']}; regenerate it with scripts/{meta['script']}.py")
        cfg = apply_regeneration(cfg, meta, task, str(cfg.regenerate))
        user_keys = set(cfg.keys())  # the recorded values win over any defaults
    declaration.validate(cfg, task)  # types and ranges first: the model paths below are used as text
    config, ckpt = resolve_model(cfg.config, cfg.ckpt)
    s = apply_model_defaults(cfg, model_sampling_defaults(config), user_keys)
    s.device = _device(s.device)
    s.negative_prompt = s.negative_prompt or ""
    s.config, s.ckpt = str(config), str(ckpt)  # config.yaml then works from any directory
    model_config = load_config(config)
    _check_dedicated_model(task, model_config, config)
    declaration.validate(s, task, timesteps=int(model_config.params.get("timesteps", 1000)))
    prompts = read_prompts(s.prompt, s.from_file)
    _check_text([*prompts, s.negative_prompt, s.outdir, s.get("init_img"), s.get("mask"),
                 s.get("depth_map"), s.get("midas_weights"), str(config), str(ckpt)])
    _check_seeds(s, len(prompts) * s.n_samples * s.n_iter)
    job = Job(task, s, prompts, config, ckpt, "", check_outdir(s.outdir))
    if task == "txt2img":
        if s.height is None or s.width is None:
            raise ValueError("height and width are needed: pass --H and --W")
    else:
        _read_inputs(job)
    side = 8 * s.vae_tile_size  # with tiling, a decode holds one tile at a time
    check_memory(min(s.height, side) if s.vae_tiling else s.height, min(s.width, side) if s.vae_tiling else s.width,
                 s.device, **_decoder_shape(model_config))
    if s.refiner_ckpt is not None:
        job.refiner = resolve_model(s.refiner_config or str(CONFIG_DIR / "stable-diffusion" / "sdxl-refiner.yaml"),
                                    s.refiner_ckpt)
        s.refiner_config, s.refiner_ckpt = map(str, job.refiner)
        job.inputs["refiner_sha256"] = sha256_of(job.refiner[1])
    elif s.refiner_config is not None:
        raise ValueError("refiner_config needs refiner_ckpt (--refiner FILE)")
    if s.vae is not None:
        if not Path(s.vae).is_file():
            raise ValueError(f"VAE file {s.vae!r} not found; pass the path of a .safetensors/.ckpt VAE")
        s.vae = str(Path(s.vae).absolute())
        job.inputs["vae_sha256"] = sha256_file(s.vae)
    if s.get("lora") is not None:
        if not Path(s.lora).is_file():
            raise ValueError(f"LoRA file {s.lora!r} not found; pass the path of a .safetensors LoRA")
        s.lora = str(Path(s.lora).absolute())
        job.inputs["lora_sha256"] = sha256_file(s.lora)
    if s.get("embeddings"):
        _read_embeddings(job)
    if s.offload == "sequential" and s.compile:
        raise ValueError("compile and offload=sequential do not go together (the layers move during the call); "
                         "drop one, or use offload=model")
    job.model_sha256 = sha256_of(ckpt)  # a file's, or a diffusers folder's (its files')
    if meta is not None:
        _check_recorded_hashes(job, meta, cfg.regenerate)
    return job


def execute(job: Job, model: Optional[torch.nn.Module] = None, *, progress: bool = True,
            refiner: Optional[torch.nn.Module] = None, callback: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Generate ``job``'s images and write them, the grid and ``config.yaml`` into its outdir.

    ``callback`` is called after every denoising step (see :func:`ldm.generation.generate`); an exception it
    raises stops the run, which then takes back the files it wrote (a way to cancel)."""
    s = job.settings
    offload = s.get("offload", "none")
    load_on = "cpu" if offload != "none" else s.device
    fresh = model is None
    if fresh:
        config = job.config if not s.get("midas_weights") else with_midas_weights(load_config(job.config), s.midas_weights)
        model = load_model(config, job.ckpt, device=load_on, use_ema=bool(s.use_ema))
    if job.task == "depth2img" and job.depth_map is None:
        check_depth_weights(model)  # before any step: a checkpoint without MiDaS weights needs midas_weights
    lora_added = s.get("lora") is not None and _apply_lora(model, s.lora, s.lora_scale, merge=fresh)
    fresh_refiner = refiner is None and job.refiner is not None
    if fresh_refiner:  # text encoder 2 and the VAE are the base's own modules when the file holds the same weights
        refiner = load_model(*job.refiner, device=load_on, share_from=model)
    if s.get("vae"):
        replace_vae(model, s.vae)
        if refiner is not None:
            refiner.first_stage_model = model.first_stage_model
    compile_ = bool(s.get("compile", False))
    for part, new in ((model, fresh), (refiner, fresh_refiner)):
        if new:
            prepare_for_inference(part, s.precision, compile=compile_, half_vae=bool(s.get("vae")),
                                  channels_last=s.get("channels_last"))
    # Textual-inversion tokens for this run only: a caller's model gets its tokenizers and embedding tables back.
    restore_embeddings = load_embeddings([model, refiner], split_specs(s.get("embeddings")))
    hooks = enable_offload([m for m in (model, refiner) if m is not None], s.device, offload)
    try:
        return _execute(job, model, refiner, progress, callback)
    finally:
        if hooks is not None:  # a caller's model is handed back as it came, not wired to move around
            hooks.remove()
        restore_embeddings()
        if lora_added:
            remove_lora(model)


def _apply_lora(model: torch.nn.Module, path: str, scale: float, merge: bool) -> bool:
    """The run's LoRA file: merged into a model the run loaded itself; a caller's model gets adapters for the run
    only. Returns whether they are to be removed afterwards."""
    if not merge and has_lora(model):
        raise ValueError("lora: the model passed in already has LoRA adapters; merge or remove them first")
    load_lora(model, path, scale)
    if merge:
        merge_lora(model)
    return not merge


def _execute(job: Job, model: torch.nn.Module, refiner: Optional[torch.nn.Module], progress: bool,
             callback: Optional[Callable[[dict], None]] = None) -> RunResult:
    sample_dir = job.outdir / "samples"
    new_dirs = [d for d in (job.outdir, sample_dir) if not d.exists()]
    written: list[Path] = []
    try:
        return _generate_and_write(job, model, refiner, sample_dir, written, progress, callback)
    except Exception:  # a late failure takes back what this run wrote; earlier runs' files stay
        for path in written:
            path.unlink(missing_ok=True)
        for folder in reversed(new_dirs):
            with contextlib.suppress(OSError):  # only if empty
                folder.rmdir()
        raise


def _generate_and_write(job: Job, model: torch.nn.Module, refiner: Optional[torch.nn.Module], sample_dir: Path,
                        written: list[Path], progress: bool,
                        callback: Optional[Callable[[dict], None]] = None) -> RunResult:
    s = job.settings
    job.outdir.mkdir(parents=True, exist_ok=True)
    if not s.skip_save:
        sample_dir.mkdir(exist_ok=True)
    index = _next_index(sample_dir, SAMPLE_PATTERN)
    per_iteration = len(job.prompts) * s.n_samples
    seeds = image_seeds(s.seed, per_iteration * s.n_iter, s.fixed_code)
    options = declaration.sampling_settings(s)
    # Every image of the run in order (iteration, prompt, sample), run batch_size at a time (default n_samples)
    # with one progress bar; each batch is saved as soon as it exists.
    run = [(prompt, seeds[k]) for k, prompt in enumerate(p for _ in range(s.n_iter) for p in job.prompts
                                                            for _ in range(s.n_samples))]
    size = s.batch_size or s.n_samples
    batches = [run[k : k + size] for k in range(0, len(run), size)]
    plans = sum(len(batch_plan(model, [p for p, _ in b], [options.negative_prompt] * len(b), options)) for b in batches)
    bar = RunProgress(plans, options.steps, progress)
    samples, shown = [], []
    try:
        for batch in batches:
            images = generate(model, [p for p, _ in batch], options, seeds=[seed for _, seed in batch],
                              init_image=job.init_image, mask=job.mask, depth_map=job.depth_map, progress=bar,
                              refiner=refiner,
                              callback=callback)
            for image, (prompt, seed) in zip(images, batch):
                if not s.skip_save:
                    meta = build_metadata(job.task, s, prompt=prompt, seed=seed, config=job.config, ckpt=job.ckpt,
                                          model_sha256=job.model_sha256, inputs=job.inputs)
                    samples.append(save_png(image, sample_dir / f"{index:05d}.png", meta))
                    written.append(samples[-1])
                    index += 1
            if not s.skip_grid:
                shown.append(images.cpu())
    finally:
        bar.close()
    grid = None
    if shown:
        grid = job.outdir / f"grid-{_next_index(job.outdir, GRID_PATTERN):04d}.png"
        written.append(save_png(make_grid(torch.cat(shown), s.n_rows or per_iteration), grid))
    config_file = job.outdir / "config.yaml"
    atomic_write(config_file, settings_yaml(s))
    return RunResult(samples, grid, config_file)


def run_task(cfg: Mapping[str, Any], task: str, user_keys: Iterable[str] = ()) -> RunResult:
    """:func:`prepare` then :func:`execute`, printing where the outputs went."""
    result = execute(prepare(cfg, task, user_keys))
    if result.samples:
        names = result.samples[0].name + (f" .. {result.samples[-1].name}" if len(result.samples) > 1 else "")
        print(f"{len(result.samples)} image(s) in {result.samples[0].parent}: {names}")
    if result.grid:
        print(f"grid: {result.grid}")
    print(f"settings: {result.config}")
    return result


def hydra_task(cfg: DictConfig, task: str) -> None:
    """Body of a script's ``@hydra.main`` function: run ``task`` with the user's overrides."""
    from hydra.core.hydra_config import HydraConfig

    keys = override_keys(HydraConfig.get().overrides.task) if HydraConfig.initialized() else set()
    guarded(run_task, cfg, task, keys)


def run_script(main: Callable[[], Any], task: str, argv: Optional[Sequence[str]] = None) -> int:
    """Call a script's Hydra ``main`` with ``argv`` (CompVis flags translated); returns the exit code."""
    try:
        overrides = guarded(translate_argv, task, sys.argv[1:] if argv is None else argv)
    except SystemExit as err:
        return int(err.code or 0)
    declaration.register_configs()  # the Hydra schema of the settings, from their declaration
    if not any(a in ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--hydra-help") for a in overrides):
        try:  # anything Hydra itself would refuse becomes one line here, not its multi-line report
            check_overrides(CONFIG_DIR, task, [o for o in overrides if not o.startswith("-")])
        except SystemExit as err:
            return int(err.code or 0)
    saved = sys.argv
    sys.argv = [saved[0] if saved else task] + overrides
    try:
        main()
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _device(name: str) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r}: no CUDA GPU is available here; use device=cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA GPU(s) here (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available here; use device=cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return name




def _check_seeds(s: Settings, n_images: int) -> None:
    last = s.seed + (0 if s.fixed_code else n_images - 1)
    if last > MAX_SEED:
        raise ValueError(f"seeds must be in [0, {MAX_SEED}] (image k gets seed + k, up to {last} here); "
                         f"use a seed of at most {MAX_SEED - (0 if s.fixed_code else n_images - 1)}")


def _check_text(values: Iterable[Optional[str]]) -> None:
    """Prompts and file names must be valid Unicode (a non-UTF-8 byte would fail only when writing)."""
    for value in values:
        if value is None:
            continue
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{ascii(value)} is not valid UTF-8 text; re-type it or rename the file") from None


def _decoder_shape(model_config: Any) -> dict[str, Any]:
    """The first stage's ``ch``/``ch_mult``, for the memory estimate (defaults: the SD VAE)."""
    dd = (model_config.params.get("first_stage_config") or {}).get("params", {}).get("ddconfig", {}) or {}
    return {k: dd[k] for k in ("ch", "ch_mult") if k in dd}


def _is_upscaler(model_config: Any) -> bool:
    from ldm.upscale import upscaler_config

    return upscaler_config(model_config) is not None


# Models that run only through their own script: task -> (is such a model, "what it is", "use instead", "run it").
_DEDICATED_TASKS = {
    "upscale": (_is_upscaler, "an upscaler",
                "--config configs/stable-diffusion/x4-upscaling.yaml with x4-upscaler-ema.safetensors",
                "scripts/upscale.py --init-img LOW_RES.png"),
    "depth2img": (is_depth_config, "a depth-to-image model",
                  "--config configs/stable-diffusion/v2-midas-inference.yaml with 512-depth-ema.ckpt",
                  "scripts/depth2img.py --init-img IMAGE"),
}


def _check_dedicated_model(task: str, model_config: Any, config: Path) -> None:
    """An upscaler or depth model runs only through its script, and that script needs such a model."""
    for dedicated, (is_kind, what, use, run_with) in _DEDICATED_TASKS.items():
        kind = is_kind(model_config)
        if task == dedicated and not kind:
            raise ValueError(f"{config} is not {what}; use {use}")
        if task != dedicated and kind:
            raise ValueError(f"{config} is {what}; run it with {run_with}")


def _read_upscale_input(job: Job) -> None:
    """The upscaler's low-res input; the output is 4x it, or --H x --W with the input resized to a quarter of it."""
    from ldm.upscale import read_low_res, upscaler_config

    s = job.settings
    if not s.init_img:
        raise ValueError("upscale needs the low-res image: pass --init-img FILE")
    factor, max_noise_level = upscaler_config(load_config(job.config))
    if max_noise_level and s.noise_level > max_noise_level:  # 0: the model has no noise augmentation
        raise ValueError(f"noise_level must be at most {max_noise_level} for this model, got {s.noise_level}")
    job.init_image, s.height, s.width = read_low_res(s.init_img, s.height, s.width, factor)
    declaration.validate({"height": s.height, "width": s.width}, job.task)
    job.inputs = {"init_img": str(Path(s.init_img).absolute()), "init_img_sha256": sha256_file(s.init_img, cache=False)}


def _read_depth_inputs(job: Job) -> None:
    """depth2img's optional depth map (read now) and MiDaS weights file (checked now, read with the model)."""
    s = job.settings
    if s.depth_map:
        job.depth_map = read_depth_map(s.depth_map)
        job.inputs.update(depth_map=str(Path(s.depth_map).absolute()),
                          depth_map_sha256=sha256_file(s.depth_map, cache=False))
    if s.midas_weights:
        check_weights_file(s.midas_weights)
        s.midas_weights = str(Path(s.midas_weights).absolute())
        job.inputs.update(midas_weights=s.midas_weights, midas_weights_sha256=sha256_file(s.midas_weights))


def _read_inputs(job: Job) -> None:
    """Read the init image (and mask) and settle the output size: as asked, else the image's, to a multiple of 8."""
    s = job.settings
    if job.task == "upscale":
        return _read_upscale_input(job)
    if not s.init_img:
        raise ValueError(f"{job.task} needs an init image: pass --init-img FILE")
    image = open_image(s.init_img, "init image")
    mask = None
    if job.task == "inpaint":
        if not s.mask:
            raise ValueError("inpaint needs a mask (white = repaint): pass --mask FILE")
        mask = open_image(s.mask, "mask")
        if mask.size != image.size:
            raise ValueError(f"mask is {mask.width}x{mask.height} but the init image is {image.width}x{image.height}; "
                             "they must match")
    s.height = s.height if s.height is not None else image.height // 8 * 8
    s.width = s.width if s.width is not None else image.width // 8 * 8
    declaration.validate({"height": s.height, "width": s.width}, job.task)
    job.init_image = image_to_tensor(image, (s.height, s.width))
    job.inputs = {"init_img": str(Path(s.init_img).absolute()), "init_img_sha256": sha256_file(s.init_img, cache=False)}
    if mask is not None:
        job.mask = mask_to_tensor(mask, (s.height, s.width))
        job.inputs.update(mask=str(Path(s.mask).absolute()), mask_sha256=sha256_file(s.mask, cache=False))
    if job.task == "depth2img":
        _read_depth_inputs(job)


def _read_embeddings(job: Job) -> None:
    """Check each textual-inversion file now (one line each) and record it by absolute path and sha256."""
    specs, hashes = [], []
    for spec in split_specs(job.settings.embeddings):
        path, token = parse_spec(spec)
        read_embedding(path)
        specs.append(str(path.absolute()) + (f":{token}" if token else ""))
        hashes.append(sha256_file(path))
    job.settings.embeddings = ";".join(specs) or None
    job.inputs["embeddings_sha256"] = hashes


def _check_recorded_hashes(job: Job, meta: dict, png: str) -> None:
    """Regeneration reproduces an image only from the very same files: refuse when one changed."""
    current = {"model_sha256": (job.ckpt, job.model_sha256)}
    if job.refiner is not None:
        current["refiner_sha256"] = (job.refiner[1], job.inputs["refiner_sha256"])
    if "vae_sha256" in job.inputs:
        current["vae_sha256"] = (job.settings.vae, job.inputs["vae_sha256"])
    if "lora_sha256" in job.inputs:
        current["lora_sha256"] = (job.settings.lora, job.inputs["lora_sha256"])
    for key in ("init_img", "mask", "depth_map", "midas_weights"):
        if key in job.inputs:
            current[f"{key}_sha256"] = (job.inputs[key], job.inputs[f"{key}_sha256"])
    recorded = meta.get("embeddings_sha256")
    if isinstance(recorded, list) and "embeddings_sha256" in job.inputs:
        specs = split_specs(job.settings.embeddings)
        for spec, digest, old in zip(specs, job.inputs["embeddings_sha256"], recorded):
            if digest != old:
                raise ValueError(f"{parse_spec(spec)[0]} has changed since {png} was made (sha256 {digest[:12]}..., "
                                 f"recorded {str(old)[:12]}...); its image cannot be reproduced")
    for key, (path, digest) in current.items():
        if meta.get(key) is not None and meta[key] != digest:
            raise ValueError(f"{path} has changed since {png} was made (sha256 {digest[:12]}..., recorded {meta[key][:12]}...); "
                             "its image cannot be reproduced")


def _next_index(folder: Path, pattern: str) -> int:
    """One past the highest number among files in ``folder`` named like ``pattern``, so runs never overwrite."""
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return max(numbers, default=-1) + 1
