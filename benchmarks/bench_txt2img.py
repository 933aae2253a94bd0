#!/usr/bin/env python
"""txt2img speed on the SD 1.x architecture (random weights, CPU): ours vs diffusers, same run.

Both sample the same prompt with classifier-free guidance (batch 2 per UNet call) at 512x512 with
DDIM. Reports seconds per step (steps after the first), images per minute (text encoding,
sampling and VAE decode), and for our fast CPU paths the PSNR of the image against fp32.

  python benchmarks/bench_txt2img.py [--steps 4] [--size 512]
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
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 autocast paths")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from benchmarks.peers import diffusers_sd1_pipeline
    from ldm.api import build_model
    from ldm.generation import generate

    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    with torch.no_grad():  # keep the random UNet's output near a trained model's scale
        model.model.diffusion_model.out[2].weight.normal_(0, 0.01)
    h = w = args.size
    results: dict[str, dict] = {}

    def run_ours(name: str, precision: str, channels_last: bool = False) -> None:
        if channels_last:
            model.model.diffusion_model.to(memory_format=torch.channels_last)
        timer = StepTimer()
        generate(model, [PROMPT], seeds=[0], steps=2, height=h, width=w, precision=precision, progress=False)  # warm-up
        t0 = time.perf_counter()
        img = generate(model, [PROMPT], seeds=[0], steps=args.steps, height=h, width=w, precision=precision,
                       callback=timer, progress=False)
        results[name] = {"step": timer.per_step(), "total": time.perf_counter() - t0, "image": img}
        print(f"  {name}: {results[name]['step']:.2f} s/step", flush=True)
        if channels_last:
            model.model.diffusion_model.to(memory_format=torch.contiguous_format)

    run_ours("ours fp32", "fp32")
    if not args.skip_bf16:
        run_ours("ours bf16 autocast", "bf16")
        run_ours("ours bf16 + channels_last", "bf16", channels_last=True)

    if not args.skip_diffusers:
        pipe = diffusers_sd1_pipeline(model, CONFIG, Path(tempfile.mkdtemp()))
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(4, h // 8, w // 8, generator=torch.Generator().manual_seed(0))[None]
        timer = StepTimer()
        pipe(PROMPT, height=h, width=w, num_inference_steps=2, guidance_scale=7.5, latents=noise)  # warm-up
        t0 = time.perf_counter()
        img = pipe(PROMPT, height=h, width=w, num_inference_steps=args.steps, guidance_scale=7.5, latents=noise,
                   output_type="pt", callback_on_step_end=lambda p, i, t, kw: (timer(), kw)[1]).images
        results["diffusers fp32"] = {"step": timer.per_step(), "total": time.perf_counter() - t0, "image": img}
        print(f"  diffusers fp32: {results['diffusers fp32']['step']:.2f} s/step", flush=True)

    ref = results["ours fp32"]["image"]
    peer = results.get("diffusers fp32")
    print(f"SD 1.x UNet, {h}x{w}, CFG batch 2, DDIM {args.steps} steps, CPU threads {torch.get_num_threads()}")
    print(f"{'run':28s} {'s/step':>8s} {'img/min':>8s} {'speed vs diffusers':>19s} {'PSNR vs fp32':>13s}")
    for name, r in results.items():
        ratio = f"{peer['step'] / r['step']:.2f}x" if peer else "-"
        quality = "-" if name == "ours fp32" else f"{psnr(r['image'], ref):.1f} dB"
        print(f"{name:28s} {r['step']:8.2f} {60 / r['total']:8.2f} {ratio:>19s} {quality:>13s}", flush=True)


if __name__ == "__main__":
    main()
