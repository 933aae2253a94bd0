#!/usr/bin/env python
"""txt2img on the SD 1.x architecture, ours vs diffusers, every row of issue 14 in one run (CPU, random weights).

    python benchmarks/bench_txt2img.py [--size 512] [--images 4] [--steps 20] [--measure-steps 3]
                                       [--skip ROW ...] [--config configs/stable-diffusion/v1-inference.yaml]
                                       [--threads N] [--json out.json] [--workdir DIR] [--keep]

Smoke test (tiny model, a minute or two plus the compile row's compilation):

    python benchmarks/bench_txt2img.py --config configs/tiny/tiny-sd1.yaml --size 64

Random weights (the UNet's output convolution drawn small, so samples stay in range as a trained model's do)
are written once to a temporary fp32 .safetensors file, with a diffusers config folder beside it (what
``from_single_file`` needs offline). Every row then runs in its own fresh process that loads that file:

  diffusers fp32                 StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True)
  diffusers bf16 weights         the same, then pipe.to(torch.bfloat16)
  diffusers bf16 autocast        fp32 weights, the call under torch.autocast("cpu", torch.bfloat16)
  diffusers bf16 + channels_last bf16 weights and pipe.unet.to(memory_format=torch.channels_last)
  ours fp32                      ldm.api.load_model + prepare_for_inference(model, "fp32") (channels_last off)
  ours bf16                      prepare_for_inference(model, "bf16") (channels_last on by default)
  ours autocast                  precision="autocast" (fp32 weights under bf16 autocast)
  ours bf16 + compile            prepare_for_inference(model, "bf16", compile=True)
  ours bf16, single runs         ours bf16 with batch_invariant=True: the images computed one at a time

Each row: a warm-up call (``--warmup-steps``), then one measured call of ``--images`` images (one prompt,
seeds 0..n-1, DDIM, guidance 7.5: UNet batch 2n) for ``--measure-steps`` steps. Diffusers gets the very
initial latents ours draws (one CPU generator per seed, noise of shape (4, H/8, W/8)), and its DDIM with
"leading" spacing and steps_offset=1 runs our "ddim" timesteps, so the images are comparable (PSNR).

Columns:
  load s      file -> model ready to sample (precision, layout, compile wrapper applied), imports excluded
  warm-up s   the first call (compile row: includes compilation, also reported on its own line)
  batch       images per UNet call (CFG doubles the images of a batch)
  s/step      mean gap between consecutive step callbacks of one batch
  fixed s     measured total - batches x measured steps x s/step: text encoding, VAE decode, the rest
  img/min@N   60 n / (fixed + batches x N x s/step): computed from the measured step and fixed times, not run
  peak GiB    the process's peak RSS (VmHWM, load included); run GiB: peak of warm-up + measured call alone
  PSNR dB     its images against ours fp32 images (same seeds and noise)
  GFLOP/s     FLOPs of the step's UNet call (counted with torch.utils.flop_counter on the meta device;
              attention as its two matmuls) / s/step; % peak: of this machine's bf16 matmul peak
              (fp32 rows: of the fp32 peak), each measured at the start as the best of 3 square matmuls

A load row times ``ldm.api.load_model(config, file)`` against diffusers' ``from_single_file`` on the same file,
each in a fresh process, up to every weight touched. If the pipeline cannot load offline, diffusers'
per-component loaders are used instead, and the output says so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.bench_sdxl import _config_targets as config_targets, original_config, vm_hwm  # noqa: E402

DEFAULT_CONFIG = str(ROOT / "configs/stable-diffusion/v1-inference.yaml")
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
CHECKPOINT_NAME = "sd1-random.safetensors"
DIFFUSERS_FOLDER = "diffusers-config"
INDUCTOR_CACHE = "inductor-cache"
PROMPT_TOKENS = 77
GiB = 2**30


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    impl: str  # "ours" | "diffusers"
    precision: str  # "fp32" | "bf16" | "autocast"
    compile: bool = False
    channels_last: bool = False  # diffusers only: ours follows prepare_for_inference's default
    single: bool = False  # ours only: batch_invariant=True (each image on its own)


ROWS = [
    Row("diffusers-fp32", "diffusers fp32", "diffusers", "fp32"),
    Row("diffusers-bf16", "diffusers bf16 weights", "diffusers", "bf16"),
    Row("diffusers-autocast", "diffusers bf16 autocast", "diffusers", "autocast"),
    Row("diffusers-bf16-cl", "diffusers bf16 + channels_last", "diffusers", "bf16", channels_last=True),
    Row("ours-fp32", "ours fp32", "ours", "fp32"),
    Row("ours-bf16", "ours bf16 (channels_last)", "ours", "bf16"),
    Row("ours-autocast", "ours autocast", "ours", "autocast"),
    Row("ours-compile", "ours bf16 + compile", "ours", "bf16", compile=True),
    Row("ours-bf16-single", "ours bf16, single runs", "ours", "bf16", single=True),
]
ROW_BY_KEY = {r.key: r for r in ROWS}
EXACT_OURS = ("ours-fp32", "ours-bf16", "ours-autocast", "ours-compile")  # batched rows, no approximation


# --------------------------------------------------------------------------------------------- small helpers

def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def latent_factor(config: str) -> int:
    """Pixels per latent pixel of the config's autoencoder (8 for SD 1.x, 2 for the tiny test model)."""
    ddconfig = original_config(config)["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    return 2 ** (len(ddconfig["ch_mult"]) - 1)


def initial_noise(seeds: list[int], size: int, factor: int) -> torch.Tensor:
    """The starting latents ours draws (ldm.models.diffusion.sampling.core.NoiseSource): per image its own CPU
    generator seeded with the image's seed, noise of shape (4, H/f, W/f) (f = 8 for SD 1.x)."""
    shape = (4, size // factor, size // factor)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


class StepTimer:
    """Step callback for both pipelines: remembers (step index, time) of each step's end."""

    def __init__(self):
        self.marks: list[tuple[int, float]] = []

    def ours(self, info: dict) -> None:
        self.marks.append((int(info["i"]), time.perf_counter()))

    def diffusers(self, pipe, i: int, t, kwargs: dict) -> dict:
        self.marks.append((int(i), time.perf_counter()))
        return kwargs

    def per_step(self) -> float:
        """Mean gap between consecutive steps of the same batch (a new batch restarts the step index)."""
        gaps = [b - a for (i, a), (j, b) in zip(self.marks, self.marks[1:]) if j == i + 1]
        return sum(gaps) / len(gaps) if gaps else float("nan")


# ------------------------------------------------------------------------------------------- files (parent)

def write_random_weights(config: str, path: Path) -> int:
    """Random SD 1.x weights (torch seed 0) as an fp32 safetensors file; returns its size in bytes."""
    from ldm.api import build_model, save_model

    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # CompVis zero-initialises it: keep the random UNet's output near a trained model's scale
        model.model.diffusion_model.out[2].weight.normal_(0, 0.01)
    save_model(model, path)
    return path.stat().st_size


def settle(path: Path) -> None:
    """Flush the just-written file to disk and read it once, so every loader finds it in the page cache
    (the first load would otherwise pay the writeback and the disk reads alone)."""
    os.sync()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def ddim_scheduler():
    """diffusers' DDIM as our "ddim" sampler runs it (leading spacing, steps_offset=1: the same timesteps)."""
    import diffusers

    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading")


def write_diffusers_folder(config: str, folder: Path) -> None:
    """The weightless diffusers folder ``StableDiffusionPipeline.from_single_file(file, config=folder,
    local_files_only=True)`` reads offline (as bench_sdxl.py writes SDXL's): model_index.json, unet / vae configs
    converted from our config by diffusers' single-file utilities, the text encoder's CLIPTextConfig (the same as
    ours), CLIP's tokenizer files and the DDIM scheduler config."""
    import diffusers
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig

    from benchmarks.peers import hf_clip_tokenizer
    from ldm.api import build_model

    model = build_model(config, empty=True)  # shapes only (meta)
    original = original_config(config)
    sd = model.state_dict(keep_vars=True)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(sub: str, cls: str, cfg: dict) -> None:
        (folder / sub).mkdir(exist_ok=True)
        body = {"_class_name": cls, "_diffusers_version": diffusers.__version__, **cfg}
        (folder / sub / "config.json").write_text(json.dumps(body, indent=2))

    scale = float(original["model"]["params"].get("scale_factor", 0.18215))
    dump("unet", "UNet2DConditionModel", sf.create_unet_diffusers_config_from_ldm(original, sd))
    dump("vae", "AutoencoderKL", sf.create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=scale))
    text = CLIPTextConfig(**model.cond_stage_model.transformer.text_model.config.to_dict())
    text.architectures = ["CLIPTextModel"]
    text.save_pretrained(folder / "text_encoder")
    hf_clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    ddim_scheduler().save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "requires_safety_checker": False, "feature_extractor": [None, None], "image_encoder": [None, None],
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# -------------------------------------------------------------------------------------- machine peak, FLOPs

def matmul_peak(dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """GFLOP/s of square matmuls in ``dtype``: the best of ``repeats`` timed calls (after one warm-up) at sizes
    n/2, 3n/4 and n (one size alone can miss the library's best blocking and under-state the peak)."""
    g = torch.Generator().manual_seed(0)
    best_rate = 0.0
    for m in sorted({n // 2, 3 * n // 4, n}):
        a, b = (torch.randn(m, m, generator=g).to(dtype) for _ in range(2))
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best_rate = max(best_rate, 2 * m**3 / (time.perf_counter() - start) / 1e9)
    return best_rate


def count_unet_flops(config: str, folder: Path, size: int) -> dict[str, float]:
    """FLOPs of one UNet call on one latent (batch 1: the count is linear in the batch), ours and diffusers',
    on the meta device (no weights, no time; SDPA falls back to its two matmuls there, so attention counts)."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.api import load_config
    from ldm.checkpoint import empty_init
    from ldm.util import instantiate_from_config

    params = load_config(config).params.unet_config.params
    side = size // latent_factor(config)
    x = torch.empty(1, params.in_channels, side, side, device="meta")
    t = torch.full((1,), 500, dtype=torch.long, device="meta")
    context = torch.empty(1, PROMPT_TOKENS, params.context_dim, device="meta")
    with empty_init():
        ours = instantiate_from_config(load_config(config).params.unet_config).eval()
        theirs = diffusers.UNet2DConditionModel.from_config(
            json.loads((folder / "unet" / "config.json").read_text())).eval()
    counts = {}
    for name, call in (("ours", lambda: ours(x, t, context=context)),
                       ("diffusers", lambda: theirs(x, t, encoder_hidden_states=context))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        counts[name] = float(counter.get_total_flops())
    return counts


# ------------------------------------------------------------------------------------ loading (in children)

def import_loaders(impl: str, config: str) -> None:
    """Import what each loader uses before its clock starts (import time is not load time)."""
    if impl == "ours":
        from ldm.api import load_model  # noqa: F401
        from ldm.util import get_obj_from_str

        for target in set(config_targets(original_config(config))):
            get_obj_from_str(target)
    else:
        import importlib

        import diffusers  # noqa: F401
        from diffusers.loaders import single_file_utils  # noqa: F401
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

        importlib.import_module("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")


def load_diffusers(file: str, folder: str) -> tuple[Any, Optional[str]]:
    """diffusers' StableDiffusionPipeline from the single file, offline; (pipeline, None), or, should
    ``from_single_file`` fail, a pipeline assembled from diffusers' per-component loaders and the error."""
    import diffusers
    from transformers import CLIPTokenizer

    kw = {"config": folder, "local_files_only": True}
    try:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(file, safety_checker=None,
                                                                  requires_safety_checker=False, **kw)
        error = None
    except Exception as e:  # reported by the parent, which then labels diffusers' loader as per-component
        from transformers import CLIPTextModel
        from diffusers.loaders import single_file_utils as sf

        error = f"{type(e).__name__}: {e}"
        checkpoint = sf.load_single_file_checkpoint(file, local_files_only=True)
        pipe = diffusers.StableDiffusionPipeline(
            unet=diffusers.UNet2DConditionModel.from_single_file(file, subfolder="unet", **kw),
            vae=diffusers.AutoencoderKL.from_single_file(file, subfolder="vae", **kw),
            text_encoder=sf.create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint,
                                                                 subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
            scheduler=diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        del checkpoint
    pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe, error


def weight_checksum(modules: list[nn.Module]) -> tuple[float, float, int]:
    """Touch every weight (lazily mapped pages count, as a first forward pass would make them) as cheaply as a
    full read can: one float32 sum per non-scalar parameter, no copy (a ``.double()`` copy of 1e9 weights would
    cost more than the load itself and hide the loaders' difference). Returns the total, the scale that total's
    round-off is relative to (the sum of the per-tensor sums' magnitudes) and the weight count."""
    params = [p for p in {id(p): p for m in modules for p in m.parameters()}.values() if p.dim()]
    sums = [float(p.detach().sum(dtype=torch.float32)) for p in params]
    return sum(sums), sum(abs(s) for s in sums), sum(p.numel() for p in params)


def child_load(impl: str, config: str, file: str, folder: str) -> dict:
    """The load row: one loader, timed up to every weight touched."""
    import_loaders(impl, config)
    base = vm_hwm()
    start = time.perf_counter()
    error = None
    if impl == "ours":
        from ldm.api import load_model

        modules = [load_model(config, file)]
    else:
        pipe, error = load_diffusers(file, folder)
        modules = [c for c in pipe.components.values() if isinstance(c, nn.Module)]
    checksum, scale, n_params = weight_checksum(modules)
    return {"seconds": time.perf_counter() - start, "peak_rss": vm_hwm(), "base_rss": base,
            "checksum": checksum, "checksum_scale": scale, "params": n_params, "pipeline_error": error}


# ------------------------------------------------------------------------------------ sampling (in children)

Runner = Callable[[int, int, Optional[StepTimer]], torch.Tensor]  # (steps, images, timer) -> images in [0, 1]


def ours_runner(row: Row, config: str, file: str, size: int) -> tuple[Runner, dict]:
    from ldm.api import load_model
    from ldm.generation import generate, prepare_for_inference

    model = load_model(config, file)
    prepare_for_inference(model, row.precision, compile=row.compile)

    def run(steps: int, n: int, timer: Optional[StepTimer]) -> torch.Tensor:
        return generate(model, [PROMPT] * n, seeds=list(range(n)), steps=steps, height=size, width=size,
                        guidance_scale=GUIDANCE, precision=row.precision, batch_invariant=row.single,
                        callback=timer.ours if timer else None, progress=False)

    return run, {}


def diffusers_runner(row: Row, config: str, file: str, folder: str, size: int) -> tuple[Runner, dict]:
    pipe, error = load_diffusers(file, folder)
    factor = latent_factor(config)
    if row.precision == "bf16":
        pipe.to(torch.bfloat16)
    if row.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    latents_dtype = torch.bfloat16 if row.precision == "bf16" else torch.float32
    autocast = row.precision == "autocast"

    def run(steps: int, n: int, timer: Optional[StepTimer]) -> torch.Tensor:
        latents = initial_noise(list(range(n)), size, factor).to(latents_dtype)
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext():
            out = pipe(PROMPT, num_images_per_prompt=n, height=size, width=size, num_inference_steps=steps,
                       guidance_scale=GUIDANCE, latents=latents, output_type="pt",
                       callback_on_step_end=timer.diffusers if timer else None)
        return out.images.float()

    return run, {"pipeline_error": error}


def child_row(row: Row, a: argparse.Namespace) -> dict:
    """One benchmark row in this fresh process: load, warm up, one measured call; images saved for PSNR."""
    import_loaders(row.impl, a.config)
    start = time.perf_counter()
    if row.impl == "ours":
        run, extra = ours_runner(row, a.config, a.child_file, a.size)
    else:
        run, extra = diffusers_runner(row, a.config, a.child_file, a.child_folder, a.size)
    load_s = time.perf_counter() - start
    load_peak = vm_hwm()
    can_reset = reset_peak_rss()

    warm_images = 1 if row.single else a.images  # a single run warms the same kernels as four
    start = time.perf_counter()
    run(a.warmup_steps, warm_images, None)
    warmup_s = time.perf_counter() - start

    timer = StepTimer()
    start = time.perf_counter()
    images = run(a.measure_steps, a.images, timer)
    total_s = time.perf_counter() - start
    run_peak = vm_hwm()
    torch.save(images.float().contiguous(), Path(a.child_out) / f"{row.key}.pt")
    return {"load_s": load_s, "warmup_s": warmup_s, "total_s": total_s, "step_s": timer.per_step(),
            "peak_rss": max(load_peak, run_peak), "run_peak_rss": run_peak if can_reset else None, **extra}


# -------------------------------------------------------------------------------------------------- parent

def run_child(args: list[str], threads: Optional[int], work: Path) -> dict:
    """Run this script as a child; its last stdout line is its JSON result. torch.compile's caches go to the
    run's own (empty) folder, so the compile row measures a first compilation, not a cache hit."""
    cmd = [sys.executable, __file__, *args] + (["--threads", str(threads)] if threads else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": str(work / INDUCTOR_CACHE)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-3000:] or f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def derive(row: Row, r: dict, a: argparse.Namespace, flops: dict, peaks: dict) -> dict:
    """Per-row figures from a child's raw times: fixed cost, images/min estimate, throughput vs the peak."""
    batches = a.images if row.single else 1
    unet_batch = 2 * (a.images // batches)
    step = r["step_s"]
    fixed = max(r["total_s"] - batches * a.measure_steps * step, 0.0)
    est = fixed + batches * a.steps * step
    gflops = flops[row.impl] * unet_batch / step / 1e9
    peak_kind = "fp32" if row.precision == "fp32" else "bf16"
    out = {"label": row.label, "batches": batches, "unet_batch": unet_batch, "fixed_s": fixed,
           "images_per_min": 60 * a.images / est, "gflops": gflops, "peak_kind": peak_kind,
           "pct_peak": 100 * gflops / peaks[peak_kind]}
    if row.compile:  # the warm-up minus what a warm call of its length costs
        out["compile_s"] = r["warmup_s"] - (fixed + a.warmup_steps * step)
    return out


def measure_rows(keys: list[str], a: argparse.Namespace, file: Path, folder: Path, work: Path,
                 flops: dict, peaks: dict) -> dict[str, dict]:
    common = ["--config", a.config, "--size", str(a.size), "--images", str(a.images),
              "--measure-steps", str(a.measure_steps), "--warmup-steps", str(a.warmup_steps),
              "--child-file", str(file), "--child-folder", str(folder), "--child-out", str(work)]
    rows: dict[str, dict] = {}
    for key in keys:
        row = ROW_BY_KEY[key]
        r = run_child(["--child", key, *common], a.threads, work)
        if "error" in r:
            print(f"  {row.label}: FAILED\n{r['error']}", flush=True)
            rows[key] = r
            continue
        r.update(derive(row, r, a, flops, peaks))
        rows[key] = r
        print(f"  {row.label}: load {r['load_s']:.1f} s, warm-up {r['warmup_s']:.1f} s, {r['step_s']:.3f} s/step, "
              f"fixed {r['fixed_s']:.2f} s, peak {r['peak_rss'] / GiB:.2f} GiB", flush=True)
    add_psnr(rows, work)
    return rows


def add_psnr(rows: dict[str, dict], work: Path) -> None:
    ref_path = work / "ours-fp32.pt"
    if "error" in rows.get("ours-fp32", {"error": 1}) or not ref_path.exists():
        return
    ref = torch.load(ref_path)
    for key, r in rows.items():
        if "error" not in r and key != "ours-fp32":
            r["psnr_db"] = psnr(torch.load(work / f"{key}.pt"), ref)


def measure_load(a: argparse.Namespace, file: Path, folder: Path, work: Path) -> dict:
    res = {impl: run_child(["--child-load", impl, "--config", a.config, "--child-file", str(file),
                            "--child-folder", str(folder)], a.threads, work) for impl in ("ours", "diffusers")}
    for impl, r in res.items():
        if "error" in r:
            print(f"  load {impl}: FAILED\n{r['error']}")
    if all("error" not in r for r in res.values()):
        o, d = res["ours"], res["diffusers"]
        res["ours_over_diffusers"] = {"seconds": o["seconds"] / d["seconds"], "peak_rss": o["peak_rss"] / d["peak_rss"]}
        res["same_weights"] = (o["params"] == d["params"]
                               and abs(o["checksum"] - d["checksum"]) <= 1e-5 * max(o["checksum_scale"], 1.0))
    return res


def summary(rows: dict[str, dict]) -> dict[str, Any]:
    """The ratios issue 14 sets goals for (ratios > 1: ours better, except the load time ratio)."""
    ok = {k: r for k, r in rows.items() if "error" not in r}
    out: dict[str, Any] = {}
    ours = [k for k in EXACT_OURS if k in ok]
    theirs = [k for k in ok if ROW_BY_KEY[k].impl == "diffusers"]
    if ours and theirs:
        best_o = min(ours, key=lambda k: ok[k]["step_s"])
        best_d = min(theirs, key=lambda k: ok[k]["step_s"])
        out["fastest"] = {"ours": best_o, "diffusers": best_d, "speedup": ok[best_d]["step_s"] / ok[best_o]["step_s"]}
    if "ours-fp32" in ok and "diffusers-fp32" in ok:
        out["fp32_speedup"] = ok["diffusers-fp32"]["step_s"] / ok["ours-fp32"]["step_s"]
    for prec, o, d in (("fp32", "ours-fp32", "diffusers-fp32"), ("bf16", "ours-bf16", "diffusers-bf16")):
        if o in ok and d in ok:
            out[f"fixed_{prec}"] = {"ours_s": ok[o]["fixed_s"], "diffusers_s": ok[d]["fixed_s"],
                                    "ours_over_diffusers": ok[o]["fixed_s"] / max(ok[d]["fixed_s"], 1e-9)}
    if "ours-bf16" in ok and "ours-bf16-single" in ok:
        out["batched_over_single"] = ok["ours-bf16"]["images_per_min"] / ok["ours-bf16-single"]["images_per_min"]
    return out


def fmt(value: Optional[float], spec: str, width: int) -> str:
    return f"{'-':>{width}s}" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:{width}{spec}}"


def print_table(res: dict, a: argparse.Namespace) -> None:
    peaks, flops = res["matmul_peak_gflops"], res["unet_gflop_per_image"]
    print(f"\nSD 1.x txt2img, {a.size}x{a.size}, {a.images} images (one prompt, seeds 0..{a.images - 1}), DDIM, "
          f"guidance {GUIDANCE}; {res['threads']} CPU threads; torch {res['torch']}, diffusers {res['diffusers']}")
    print(f"matmul peak (square, best of 3 at n = {a.matmul_size}/2, 3/4, 1): bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} "
          f"GFLOP/s; UNet call per latent: ours {flops['ours']:.1f} GFLOP, diffusers {flops['diffusers']:.1f} GFLOP")
    print(f"s/step: mean gap between step callbacks ({a.measure_steps} measured steps); img/min@{a.steps}: computed "
          f"from the measured s/step and fixed cost as 60*{a.images}/(fixed + {a.steps}*s/step per batch), not run")
    head = (f"{'row':32s} {'load s':>7s} {'warm-up s':>9s} {'batch':>5s} {'s/step':>8s} {'fixed s':>8s} "
            f"{f'img/min@{a.steps}':>10s} {'peak GiB':>8s} {'run GiB':>7s} {'PSNR dB':>7s} {'GFLOP/s':>8s} "
            f"{'% peak':>9s}")
    print(head)
    for key, r in res["rows"].items():
        label = ROW_BY_KEY[key].label.replace("single runs", f"{a.images} single runs")
        if "error" in r:
            print(f"{label:32s} failed (see above)")
            continue
        run_gib = r["run_peak_rss"] / GiB if r["run_peak_rss"] else None
        pct = f"{r['pct_peak']:.1f}% {r['peak_kind']}"
        print(f"{label:32s} {r['load_s']:7.1f} {r['warmup_s']:9.1f} {r['unet_batch']:5d} {r['step_s']:8.3f} "
              f"{r['fixed_s']:8.2f} {r['images_per_min']:10.2f} {r['peak_rss'] / GiB:8.2f} {fmt(run_gib, '.2f', 7)} "
              f"{fmt(r.get('psnr_db'), '.1f', 7)} {r['gflops']:8.1f} {pct:>9s}")
    for key, r in res["rows"].items():
        if "compile_s" in r:
            print(f"{ROW_BY_KEY[key].label}: compilation ~{r['compile_s']:.1f} s (warm-up {r['warmup_s']:.1f} s "
                  f"minus a warm {a.warmup_steps}-step call's estimated time)")
        if r.get("pipeline_error"):
            print(f"{ROW_BY_KEY[key].label}: from_single_file failed offline, per-component loaders used")
    print_load(res.get("load"))
    print_summary(res["summary"], res["rows"])


def print_load(load: Optional[dict]) -> None:
    if not load or any("error" in load.get(k, {}) for k in ("ours", "diffusers")):
        return
    o, d = load["ours"], load["diffusers"]
    how = ("StableDiffusionPipeline.from_single_file" if not d["pipeline_error"] else
           "per-component from_single_file (the pipeline loader failed offline: " + d["pipeline_error"][:200] + ")")
    print(f"\nload, fresh process each, up to every weight touched (imports excluded): "
          f"ours ldm.api.load_model {o['seconds']:.2f} s, peak {o['peak_rss'] / GiB:.2f} GiB | "
          f"diffusers {how} {d['seconds']:.2f} s, peak {d['peak_rss'] / GiB:.2f} GiB")
    r = load["ours_over_diffusers"]
    print(f"load ours/diffusers: time {r['seconds']:.2f}x (goal <= 0.5x), peak RSS {r['peak_rss']:.2f}x; "
          f"same weights: {'yes' if load['same_weights'] else 'NO (checksums differ)'}")


def print_summary(s: dict, rows: dict) -> None:
    parts = []
    if "fastest" in s:
        f = s["fastest"]
        parts.append(f"fastest exact path ours ({ROW_BY_KEY[f['ours']].label}) vs diffusers "
                     f"({ROW_BY_KEY[f['diffusers']].label}): {f['speedup']:.2f}x (goal >= 1.1x)")
    if "fp32_speedup" in s:
        parts.append(f"fp32 ours vs diffusers: {s['fp32_speedup']:.2f}x (goal >= 1.0x)")
    for prec in ("fp32", "bf16"):
        if f"fixed_{prec}" in s:
            x = s[f"fixed_{prec}"]
            parts.append(f"fixed cost {prec} ours/diffusers: {x['ours_s']:.2f}/{x['diffusers_s']:.2f} s "
                         f"= {x['ours_over_diffusers']:.2f}x")
    if "batched_over_single" in s:
        parts.append(f"batched vs single runs (ours bf16, img/min): {s['batched_over_single']:.2f}x")
    print("\nsummary: " + "; ".join(parts) if parts else "\nsummary: not enough rows for the ratios")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="SD 1.x model YAML (random weights of it are used)")
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    p.add_argument("--images", type=int, default=4, help="images per measured call (UNet batch 2x with CFG)")
    p.add_argument("--steps", type=int, default=20, help="steps of the images/min estimate")
    p.add_argument("--measure-steps", type=int, default=3, help="steps of the measured call (>= 2)")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of the warm-up call")
    p.add_argument("--skip", nargs="+", default=[], choices=[r.key for r in ROWS] + ["load"], metavar="ROW",
                   help=f"rows to leave out: {', '.join(r.key for r in ROWS)}, load")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n^3 matmul measuring the peak")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--workdir", default=None, help="where the weights file goes (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the weights file, diffusers folder and images")
    for hidden in ("--child", "--child-write", "--child-load", "--child-file", "--child-folder", "--child-out"):
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.size % 8 or a.measure_steps < 2 or a.images < 1 or a.warmup_steps < 1:
        p.error("--size must be a multiple of 8, --measure-steps at least 2, --images and --warmup-steps at least 1")
    return a


def main() -> None:
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    if a.child:
        return print(json.dumps(child_row(ROW_BY_KEY[a.child], a)))
    if a.child_write:
        return print(json.dumps({"file_bytes": write_random_weights(a.config, Path(a.child_file))}))
    if a.child_load:
        return print(json.dumps(child_load(a.child_load, a.config, a.child_file, a.child_folder)))

    import diffusers

    work = Path(a.workdir or tempfile.mkdtemp(prefix="ldm-bench-txt2img-"))
    work.mkdir(parents=True, exist_ok=True)
    file, folder = work / CHECKPOINT_NAME, work / DIFFUSERS_FOLDER
    res: dict[str, Any] = {"config": a.config, "size": a.size, "images": a.images, "steps": a.steps,
                           "measure_steps": a.measure_steps, "warmup_steps": a.warmup_steps,
                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                           "diffusers": diffusers.__version__}
    try:
        start = time.perf_counter()
        # A child writes the weights: this process keeps no 4 GiB of freed model memory while the rows run.
        written = run_child(["--child-write", "1", "--config", a.config, "--child-file", str(file)], a.threads, work)
        if "error" in written:
            raise SystemExit(f"writing the random weights failed:\n{written['error']}")
        res["file_bytes"] = written["file_bytes"]
        settle(file)
        write_diffusers_folder(a.config, folder)
        print(f"wrote {res['file_bytes'] / GiB:.2f} GiB of random fp32 weights and the diffusers config folder in "
              f"{time.perf_counter() - start:.0f} s: {work}", flush=True)
        res["matmul_peak_gflops"] = {"bf16": matmul_peak(torch.bfloat16, a.matmul_size),
                                     "fp32": matmul_peak(torch.float32, a.matmul_size)}
        res["unet_gflop_per_image"] = {k: v / 1e9 for k, v in count_unet_flops(a.config, folder, a.size).items()}
        flops = {k: v * 1e9 for k, v in res["unet_gflop_per_image"].items()}
        if "load" not in a.skip:
            print("load row ...", flush=True)
            res["load"] = measure_load(a, file, folder, work)
        keys = [r.key for r in ROWS if r.key not in a.skip]
        print(f"rows: {', '.join(keys)}", flush=True)
        res["rows"] = measure_rows(keys, a, file, folder, work, flops, res["matmul_peak_gflops"])
        res["summary"] = summary(res["rows"])
        print_table(res, a)
    finally:
        if a.keep:
            print(f"kept {work}")
        elif a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            file.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(work / INDUCTOR_CACHE, ignore_errors=True)
            for r in ROWS:
                (work / f"{r.key}.pt").unlink(missing_ok=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
