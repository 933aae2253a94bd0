#!/usr/bin/env python
"""Approximate accelerations (off by default) against the exact path, measured in the same run.

On the bundled digits demo at its default settings (16x16, DDIM 25 steps, guidance 3), for the exact path,
feature reuse at its default (``deepcache_interval=3``, ``deepcache_depth=1``), token merging at its default
(``tome_ratio=0.5``; also merging for every sub-layer two levels deep, and 0.75 of the tokens for every sub-layer
three levels deep), few-step sampling without distillation (DDIM 4 steps; the ``lcm`` sampler, 1 step) and the
bundled LCM-LoRA (``ldm/assets/digits_demo/lcm-lora.safetensors``, merged; 1, 2 and 4 steps): images per
minute (best of ``--repeats`` timed generate() calls of ``10 * --per-digit`` images, paths interleaved), digit accuracy by the independent classifier of ``ldm.digit_metrics``, and the mean
absolute pixel difference (0..1 scale) from the exact images.

``--sd-unet``: also one UNet call of SD 1.x size (random weights, ``--sd-size`` images, default 512x512 = 64x64
latents, CFG batch 2, ``--sd-precision`` fp32 or bf16): seconds for the exact call, a feature-reuse call (and the
average of an interval-3 cycle: one full + two reuse calls) and token-merged calls (each of ``--tome-ratios`` x
``--tome-layers`` x ``--tome-max-downsample``). The ratios
are what a real SD run would gain per step, where the demo UNet is too small for merging 16 tokens to matter;
token merging gains more the more tokens the top level holds (quadratic attention).

  python benchmarks/bench_approx.py [--per-digit 10] [--repeats 2] [--threads 2]
  python benchmarks/bench_approx.py --skip-demo --sd-unet --sd-size 1024 --sd-precision bf16 --tome-ratios 0.5 0.75 \
      --tome-layers self_attention all --tome-max-downsample 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "ldm" / "assets" / "digits_demo"
LCM_LORA = DEMO / "lcm-lora.safetensors"
# "model": "lcm" runs on a copy of the demo with the bundled LCM-LoRA merged in (as diffusers' fuse_lora).
PATHS: dict[str, dict] = {
    "exact": {},
    "feature reuse (deepcache_interval=3, depth 1)": {"deepcache_interval": 3},
    "token merging (tome_ratio=0.5)": {"tome_ratio": 0.5},
    "token merging (0.5, tome_layers=all, tome_max_downsample=2)": {"tome_ratio": 0.5, "tome_layers": "all",
                                                                    "tome_max_downsample": 2},
    "token merging (0.75, tome_layers=all, tome_max_downsample=4)": {"tome_ratio": 0.75, "tome_layers": "all",
                                                                     "tome_max_downsample": 4},
    "few steps, no distillation: ddim 4 steps": {"steps": 4},
    "few steps, no distillation: lcm 1 step": {"sampler": "lcm", "steps": 1},
    "LCM-LoRA, lcm 1 step, guidance 1": {"model": "lcm", "sampler": "lcm", "steps": 1, "guidance_scale": 1.0},
    "LCM-LoRA, lcm 2 steps, guidance 1": {"model": "lcm", "sampler": "lcm", "steps": 2, "guidance_scale": 1.0},
    "LCM-LoRA, lcm 4 steps, guidance 1": {"model": "lcm", "sampler": "lcm", "steps": 4, "guidance_scale": 1.0},
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def demo_rows(per_digit: int, repeats: int) -> None:
    from omegaconf import OmegaConf

    from ldm.api import load_model
    from ldm.digit_metrics import digit_classifier, digit_prompt, to_digit_features
    from ldm.generation import generate

    from ldm.lora import load_lora, merge_lora

    model = load_model(DEMO / "config.yaml", DEMO / "model.safetensors")
    lcm = load_model(DEMO / "config.yaml", DEMO / "model.safetensors")
    load_lora(lcm, LCM_LORA)
    merge_lora(lcm)
    defaults = dict(OmegaConf.to_container(OmegaConf.load(DEMO / "config.yaml").sampling))
    labels = [d for d in range(10) for _ in range(per_digit)]
    prompts = [digit_prompt(d) for d in labels]
    seeds = list(range(1000, 1000 + len(prompts)))

    def run(extra: dict) -> torch.Tensor:
        extra = dict(extra)
        which = lcm if extra.pop("model", None) == "lcm" else model
        return generate(which, prompts, seeds=seeds, progress=False, **{**defaults, **extra})

    run({})  # warm-up (first-call allocations, classifier-free caches)
    images: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every path alike
        for name, extra in PATHS.items():
            start = time.perf_counter()
            images[name] = run(extra)
            times[name].append(time.perf_counter() - start)
    classifier = digit_classifier()
    print(f"digits demo: {len(prompts)} images, {defaults}, {torch.get_num_threads()} threads, best of {repeats}")
    print("| path | images/min | vs exact | digit accuracy | mean abs pixel diff from exact |")
    print("|---|---|---|---|---|")
    exact_rate = None
    for name in PATHS:
        rate = 60 * len(prompts) / min(times[name])
        exact_rate = exact_rate or rate
        accuracy = float((classifier.predict(to_digit_features(images[name])) == labels).mean())
        diff = (images[name] - images["exact"]).abs().mean().item()
        print(f"| {name} | {rate:.0f} | {rate / exact_rate:.2f}x | {100 * accuracy:.1f}% | {diff:.4f} |")


def sd_unet_rows(repeats: int, size: int = 512, precision: str = "fp32", ratios: tuple[float, ...] = (0.5,),
                 layers: tuple[str, ...] = ("self_attention",), downsamples: tuple[int, ...] = (1,)) -> None:
    from omegaconf import OmegaConf

    from ldm.modules.diffusionmodules.feature_reuse import FeatureReuse
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.tome import TokenMerging

    params = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml")
                                    .model.params.unet_config.params)
    params["use_checkpoint"] = False
    torch.manual_seed(0)
    unet = UNetModel(**params).eval()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    layout = torch.channels_last if precision == "bf16" else torch.contiguous_format  # generate()'s bf16 layout
    unet = unet.to(dtype=dtype, memory_format=layout)
    g = torch.Generator().manual_seed(0)
    side = size // 8
    x, ctx = torch.randn(2, 4, side, side, generator=g), torch.randn(2, 77, 768, generator=g)
    x = x.to(dtype).contiguous(memory_format=layout)
    t = torch.tensor([500, 500])

    def call() -> None:
        unet(x, t, context=ctx)

    call()  # warm-up
    exact: list[float] = []
    variants = [(r, lay, ds) for r in ratios for lay in layers for ds in downsamples]
    merged: dict[tuple, list[float]] = {v: [] for v in variants}
    reused: list[float] = []
    for _ in range(repeats):
        exact.append(timed(call))
        for ratio, lay, ds in variants:
            with TokenMerging(unet, ratio, lay, ds):
                merged[ratio, lay, ds].append(timed(call))
        with FeatureReuse(unet, interval=10**6, depth=1):
            call()  # the full call that fills the cache
            reused.append(timed(call))
    full, shallow = min(exact), min(reused)
    cycle = (full + 2 * shallow) / 3
    print(f"\nSD 1.x UNet, {side}x{side} latents ({size}x{size}), CFG batch 2, {precision}, random weights, "
          f"{torch.get_num_threads()} threads, best of {repeats}:")
    print("| path | s per UNet call | vs exact |")
    print("|---|---|---|")
    print(f"| exact | {full:.2f} | 1.00x |")
    print(f"| feature reuse, a reuse call (depth 1) | {shallow:.2f} | {full / shallow:.2f}x |")
    print(f"| feature reuse, interval 3 average (1 full + 2 reuse) | {cycle:.2f} | {full / cycle:.2f}x |")
    for ratio, lay, ds in variants:
        tome = min(merged[ratio, lay, ds])
        print(f"| token merging {ratio}, layers {lay}, max_downsample {ds} | {tome:.2f} | {full / tome:.2f}x |")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sd-unet", action="store_true", help="also time one SD 1.x-size UNet call per path")
    parser.add_argument("--sd-size", type=int, default=512, help="image side of the --sd-unet rows (multiple of 64)")
    parser.add_argument("--sd-precision", choices=("fp32", "bf16"), default="fp32",
                        help="weights of the --sd-unet rows (bf16: channels-last, as generate() stores them)")
    parser.add_argument("--tome-ratios", type=float, nargs="+", default=[0.5], help="token merging ratios timed")
    parser.add_argument("--tome-layers", nargs="+", default=["self_attention"],
                        choices=("self_attention", "attention", "all"), help="token merging layers timed")
    parser.add_argument("--tome-max-downsample", type=int, nargs="+", default=[1], choices=(1, 2, 4, 8),
                        help="token merging depths timed")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not args.skip_demo:
        demo_rows(args.per_digit, args.repeats)
    if args.sd_unet:
        sd_unet_rows(args.repeats, args.sd_size, args.sd_precision, tuple(args.tome_ratios), tuple(args.tome_layers),
                     tuple(args.tome_max_downsample))


if __name__ == "__main__":
    main()
