#!/usr/bin/env python
"""Ours against diffusers call by call: SD 1.x's UNet step and VAE decode timed in alternation, in one process, on
the same random weights.

``bench_txt2img.py`` runs each row in its own fresh process, one row after another, 40 minutes for all of them; on
a shared host the machine's speed drifts meanwhile (its ratios moved by up to 18% between runs). Here each round
times every variant once, back to back, in an order that rotates from round to round, so each ratio compares calls
made seconds apart, and the spread of the per-round ratios shows how far the host's noise reaches.

Weights: our model's random initialisation (torch seed 0; the UNet's output convolution drawn at std 0.01 as
``bench_txt2img.py`` does), converted for diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` by diffusers' own
single-file converters (not ours). The outputs' largest difference is printed as the like-for-like check.

Variants, per part (``unet``: one UNet call with CFG, batch 2 at ``--size``, 77 prompt tokens; ``decode``: one
VAE decode of ``--decode-batch`` latents, scaling included):
  fp32      ours as ``prepare_for_inference(model, "fp32")`` leaves it (NCHW) vs diffusers fp32
  autocast  fp32 weights under ``torch.autocast("cpu", torch.bfloat16)``, both
  bf16      ours as ``prepare_for_inference(model, "bf16")`` leaves it (bf16 weights, channels_last) vs diffusers
            bf16 weights, NCHW and a channels_last copy (its faster of the two in each round counts)
Ratios are diffusers' seconds over ours (> 1: ours faster). "fastest exact" compares, per round, the fastest of our
variants with the fastest of diffusers' (autocast counts: it changes no weights).

  python benchmarks/bench_paired.py [--rounds 4] [--parts unet decode] [--precisions fp32 bf16 autocast]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_sdxl import original_config  # noqa: E402
from benchmarks.bench_txt2img import DEFAULT_CONFIG, PROMPT_TOKENS, latent_factor  # noqa: E402

PRECISIONS = ("fp32", "autocast", "bf16")
PARTS = ("unet", "decode")


def build_pair(config: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, float]:
    """Our LatentDiffusion (random, seed 0) and diffusers' UNet and VAE holding the same weights."""
    import diffusers
    from diffusers.loaders import single_file_utils as sf

    from ldm.api import build_model

    torch.manual_seed(0)
    ours = build_model(config).eval()
    with torch.no_grad():  # CompVis zero-initialises it; a trained model's output has about this scale
        ours.model.diffusion_model.out[2].weight.normal_(0, 0.01)
    ours.cond_stage_model = None  # the text encoder is not timed here (transformers' CLIP on both sides)
    sd = ours.state_dict()
    original = original_config(config)
    scale = float(original["model"]["params"].get("scale_factor", 0.18215))
    unet_cfg = sf.create_unet_diffusers_config_from_ldm(original, sd)
    unet = diffusers.UNet2DConditionModel.from_config(unet_cfg).eval()
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(sd, unet_cfg), strict=True)
    vae_cfg = sf.create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=scale)
    vae = diffusers.AutoencoderKL.from_config(vae_cfg).eval()
    vae.load_state_dict(sf.convert_ldm_vae_checkpoint(sd, vae_cfg), strict=True)
    del sd
    return ours, unet, vae, scale


def calls(part: str, precision: str, ours: torch.nn.Module, unet: torch.nn.Module, vae: torch.nn.Module,
          twins: dict[str, torch.nn.Module], scale: float, size: int, decode_batch: int,
          factor: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The variants of one part at one precision (models already in that precision's form; ``twins``: diffusers'
    channels_last copies under bf16)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    side = size // factor
    g = torch.Generator().manual_seed(0)
    if part == "unet":
        x = torch.randn(2, 4, side, side, generator=g).to(dtype)
        t = torch.tensor([500, 500])
        context = torch.randn(2, PROMPT_TOKENS, unet.config.cross_attention_dim, generator=g).to(dtype)
        net = ours.model.diffusion_model
        variants = {"ours": lambda: net(x, t, context=context),
                    "diffusers": lambda: unet(x, t, encoder_hidden_states=context).sample}
        if "unet" in twins:
            variants["diffusers-cl"] = lambda: twins["unet"](x, t, encoder_hidden_states=context).sample
    else:
        z = torch.randn(decode_batch, 4, side, side, generator=g).to(dtype)
        variants = {"ours": lambda: ours.decode_first_stage(z),
                    "diffusers": lambda: vae.decode(z / scale).sample}
        if "vae" in twins:
            variants["diffusers-cl"] = lambda: twins["vae"].decode(z / scale).sample
    if precision == "autocast":
        def autocast(run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
            def wrapped() -> torch.Tensor:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return run()
            return wrapped

        variants = {k: autocast(v) for k, v in variants.items()}
    return variants


def timed(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def measure(variants: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict:
    """One warm-up call each, then ``rounds`` rounds timing every variant once, the order rotating each round."""
    names = list(variants)
    outs = {k: timed(v)[1].float() for k, v in variants.items()}
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            seconds[k].append(timed(variants[k])[0])
    theirs = [k for k in names if k != "ours"]
    best_theirs = [min(seconds[k][i] for k in theirs) for i in range(rounds)]
    ratios = [b / o for b, o in zip(best_theirs, seconds["ours"])]
    ref = outs["diffusers"]
    return {"seconds": seconds, "ratio_per_round": ratios,
            "max_abs_diff": float((outs["ours"] - ref).abs().max()), "output_scale": float(ref.abs().max())}


def to_precision(ours: torch.nn.Module, unet: torch.nn.Module, vae: torch.nn.Module,
                 precision: str) -> dict[str, torch.nn.Module]:
    """Each side in that precision's form: ours through prepare_for_inference, diffusers as its bf16 rows do.
    Returns diffusers' channels_last copies under bf16 (bench_txt2img's "bf16 + channels_last" row)."""
    import copy

    from ldm.generation import prepare_for_inference

    prepare_for_inference(ours, "bf16" if precision == "bf16" else "fp32")
    if precision != "bf16":
        return {}
    unet.to(torch.bfloat16)
    vae.to(torch.bfloat16)
    return {k: copy.deepcopy(m).to(memory_format=torch.channels_last) for k, m in (("unet", unet), ("vae", vae))}


def summarise(res: dict) -> dict:
    """Per round, the fastest of our exact variants against diffusers' fastest."""
    out = {}
    for part, by_prec in res.items():
        precs = [p for p in PRECISIONS if p in by_prec]
        if len(precs) < 2:
            continue
        rounds = len(by_prec[precs[0]]["seconds"]["ours"])
        ours = [min(by_prec[p]["seconds"]["ours"][i] for p in precs) for i in range(rounds)]
        theirs = [min(s[i] for p in precs for k, s in by_prec[p]["seconds"].items() if k != "ours")
                  for i in range(rounds)]
        out[part] = [t / o for t, o in zip(theirs, ours)]
    return out


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}x (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="SD 1.x model YAML (random weights of it are used)")
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    p.add_argument("--decode-batch", type=int, default=1, help="latents per VAE decode")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each times every variant once)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    a = p.parse_args()
    if a.size % 8 or a.rounds < 1 or a.decode_batch < 1:
        p.error("--size must be a multiple of 8, --rounds and --decode-batch at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    import diffusers

    start = time.perf_counter()
    ours, unet, vae, scale = build_pair(a.config)
    factor = latent_factor(a.config)
    print(f"SD 1.x UNet and VAE, ours vs diffusers {diffusers.__version__} (same random weights, built in "
          f"{time.perf_counter() - start:.0f} s); {a.size}x{a.size}, UNet batch 2 (CFG), decode batch "
          f"{a.decode_batch}; {torch.get_num_threads()} threads, torch {torch.__version__}; {a.rounds} rounds",
          flush=True)
    res: dict[str, dict] = {part: {} for part in a.parts}
    # bf16 last: converting to it is one way.
    for precision in [q for q in PRECISIONS if q in a.precisions]:
        twins = to_precision(ours, unet, vae, precision)
        for part in a.parts:
            r = measure(calls(part, precision, ours, unet, vae, twins, scale, a.size, a.decode_batch, factor),
                        a.rounds)
            res[part][precision] = r
            times = ", ".join(f"{k} best {min(s):.2f} s / median {statistics.median(s):.2f} s"
                              for k, s in r["seconds"].items())
            print(f"{part:6s} {precision:8s} {times}\n{'':16s}diffusers/ours {spread(r['ratio_per_round'])}; "
                  f"outputs differ by <= {r['max_abs_diff']:.2e} (scale {r['output_scale']:.2f})", flush=True)
    for part, ratios in summarise(res).items():
        print(f"{part}: fastest exact variant, diffusers/ours per round: {spread(ratios)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "torch": torch.__version__,
                                            "diffusers": diffusers.__version__, "results": res,
                                            "fastest_exact": summarise(res)}, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
