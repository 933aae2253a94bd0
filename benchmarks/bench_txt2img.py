#!/usr/bin/env python
"""txt2img speed on the SD 1.x architecture (random weights, CPU): ours vs diffusers, same run.

Both sample the same prompt with classifier-free guidance (batch 2 per UNet call) with DDIM.
Reports seconds per step (steps after the first), images per minute for the measured run and
estimated for 50 steps (the run's fixed cost -- text encoding, VAE decode -- plus 50 steps), and
for our fast paths the PSNR of the image against our fp32 image.

Rows: ours fp32; ours autocast (fp32 weights under bf16 autocast, as CompVis' --precision autocast);
ours bf16 (weights stored in bf16, precision=bf16 in the scripts); ours bf16 + torch.compile
(compile=true); diffusers' StableDiffusionPipeline in fp32 built from the same weights.

  python benchmarks/bench_txt2img.py [--steps 3] [--size 512] [--skip-autocast] [--skip-compile]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs/stable-diffusion/v1-inference.yaml")
PROMPT = "a photograph of an astronaut riding a horse"


class StepTimer:
    def __init__(self):
        self.times: list[float] = []

    def __call__(self, *args, **kwargs):
        self.times.append(time.perf_counter())

    def per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return sum(gaps) / max(len(gaps), 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-autocast", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from benchmarks.peers import diffusers_sd1_pipeline
    from ldm.api import build_model
    from ldm.generation import generate, prepare_for_inference

    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    with torch.no_grad():  # keep the random UNet's output near a trained model's scale
        model.model.diffusion_model.out[2].weight.normal_(0, 0.01)
    h = w = args.size
    results: dict[str, dict] = {}

    def record(name: str, timer: StepTimer, total: float, image: torch.Tensor) -> None:
        step = timer.per_step()
        fixed = max(total - args.steps * step, 0.0)
        results[name] = {"step": step, "total": total, "fixed": fixed, "image": image.float()}
        print(f"  {name}: {step:.2f} s/step, fixed cost {fixed:.1f} s", flush=True)

    def run_ours(name: str, precision: str) -> None:
        timer = StepTimer()
        t0 = time.perf_counter()
        generate(model, [PROMPT], seeds=[0], steps=2, height=h, width=w, precision=precision, progress=False)  # warm-up
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        img = generate(model, [PROMPT], seeds=[0], steps=args.steps, height=h, width=w, precision=precision,
                       callback=timer, progress=False)
        record(name, timer, time.perf_counter() - t0, img)

    if not args.skip_diffusers:  # built first: it copies the fp32 weights before ours are cast
        pipe = diffusers_sd1_pipeline(model, CONFIG, Path(tempfile.mkdtemp()))
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))[None]
        timer = StepTimer()
        pipe(PROMPT, height=h, width=w, num_inference_steps=2, guidance_scale=7.5, latents=noise)  # warm-up
        t0 = time.perf_counter()
        img = pipe(PROMPT, height=h, width=w, num_inference_steps=args.steps, guidance_scale=7.5, latents=noise,
                   output_type="pt", callback_on_step_end=lambda p, i, t, kw: (timer(), kw)[1]).images
        record("diffusers fp32", timer, time.perf_counter() - t0, img)
        del pipe

    run_ours("ours fp32", "fp32")
    if not args.skip_autocast:
        run_ours("ours autocast (bf16)", "autocast")
    if not args.skip_bf16:
        prepare_for_inference(model, "bf16")
        run_ours("ours bf16", "bf16")
        if not args.skip_compile:
            prepare_for_inference(model, "bf16", compile=True)
            run_ours("ours bf16 + compile", "bf16")

    ref = results["ours fp32"]["image"]
    peer = results.get("diffusers fp32")
    print(f"SD 1.x UNet, {h}x{w}, CFG batch 2, DDIM {args.steps} steps, CPU threads {torch.get_num_threads()}")
    print(f"{'run':24s} {'s/step':>7s} {'speed vs diffusers':>19s} {'img/min':>8s} {'img/min@50 (est.)':>18s} "
          f"{'PSNR vs ours fp32':>18s}")
    for name, r in results.items():
        ratio = f"{peer['step'] / r['step']:.2f}x" if peer else "-"
        quality = "-" if not name.startswith("ours ") or name == "ours fp32" else f"{psnr(r['image'], ref):.1f} dB"
        est = 60 / (r["fixed"] + 50 * r["step"])
        print(f"{name:24s} {r['step']:7.2f} {ratio:>19s} {60 / r['total']:8.2f} {est:18.2f} {quality:>18s}", flush=True)


if __name__ == "__main__":
    main()
