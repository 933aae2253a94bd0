#!/usr/bin/env python
"""Inspect, check and convert Stable Diffusion checkpoints (CompVis layout), safely.

  python scripts/ckpt_tool.py inspect  FILE
  python scripts/ckpt_tool.py check    FILE --config configs/stable-diffusion/v1-inference.yaml [--ema]
  python scripts/ckpt_tool.py convert  IN OUT.safetensors [--ema] [--dtype fp16] [--drop-ema]
  python scripts/ckpt_tool.py convert  IN.safetensors OUT_FOLDER [--config CFG] [--ema] [--dtype fp16]  (to diffusers)
  python scripts/ckpt_tool.py convert  DIFFUSERS_FOLDER OUT.safetensors [--config CFG] [--dtype fp16]  (from diffusers)

Errors are printed as one line (exit code 2); nothing is half-written.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # any other output of convert is a diffusers folder
PARTS = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text encoder",
         "model_ema.": "ema", "conditioner.": "text encoder"}


def cmd_inspect(args) -> None:
    from ldm.api import guess_architecture
    from ldm.checkpoint import checkpoint_metadata, read_state_dict

    sd = read_state_dict(args.file, allow_unsafe_pickle=args.unsafe_pickle)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    parts: Counter = Counter()
    for k, v in sd.items():
        parts[next((name for p, name in PARTS.items() if k.startswith(p)), "other")] += v.numel()
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    print(f"file: {args.file}")
    print(f"architecture: {guess_architecture(shapes)}")
    print(f"keys: {len(sd)}  dtypes: {dict(dtypes)}")
    for name, n in sorted(parts.items()):
        print(f"  {name:13s} {n:>14,d} elements")
    meta = checkpoint_metadata(args.file, allow_unsafe_pickle=args.unsafe_pickle)
    if meta:
        print(f"metadata: {meta}")


def cmd_check(args) -> None:
    from ldm.api import load_model

    model = load_model(args.config, args.file, use_ema=args.ema, allow_unsafe_pickle=args.unsafe_pickle, device="cpu")
    n = sum(p.numel() for p in model.parameters())
    print(f"ok: {args.file} loads strictly into {type(model).__name__} from {args.config} ({n:,d} parameters)")


def cmd_convert(args) -> None:
    import torch

    from ldm.checkpoint import read_state_dict, save_state_dict

    if Path(args.input).is_dir() or Path(args.output).suffix.lower() not in CHECKPOINT_SUFFIXES:
        from ldm.diffusers_convert import convert

        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        print(convert(args.input, args.output, config=args.config, use_ema=args.ema, dtype=dtype,
                      allow_unsafe_pickle=args.unsafe_pickle))
        return
    if args.config is not None:
        raise SystemExit("error: --config is for conversions to or from a diffusers folder; drop it")
    sd = read_state_dict(args.input, allow_unsafe_pickle=args.unsafe_pickle)
    if args.ema:
        ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")}
        if not ema:
            raise SystemExit(f"error: {args.input} has no model_ema.* keys; drop --ema to keep its raw weights")
        for k in [k for k in sd if k.startswith("model.")]:
            s_name = k[len("model."):].replace(".", "")
            if s_name in ema:
                sd[k] = ema[s_name]
    if args.ema or args.drop_ema:
        sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    save_state_dict(sd, args.output, dtype=dtype, metadata={"converted_from": Path(args.input).name})
    print(f"wrote {args.output} ({len(sd)} tensors)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    unsafe_help = "allow full unpickling of .ckpt files (runs code: trusted files only)"
    parser.add_argument("--unsafe-pickle", action="store_true", help=unsafe_help)
    common = argparse.ArgumentParser(add_help=False)  # the flag is also accepted after the command
    common.add_argument("--unsafe-pickle", action="store_true", default=argparse.SUPPRESS, help=unsafe_help)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="summarise a checkpoint", parents=[common])
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("check", help="load strictly into the model of a config", parents=[common])
    p.add_argument("file")
    p.add_argument("--config", required=True)
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("convert", help="rewrite as safetensors (optionally EMA-only, fp16), or to/from a diffusers "
                       "folder", parents=[common])
    p.add_argument("input", help="a checkpoint file, or a diffusers folder (then OUT is a .safetensors file)")
    p.add_argument("output", help="OUT.safetensors/.ckpt, or a new folder name: a diffusers folder")
    p.add_argument("--config", help="model YAML of the checkpoint side of a diffusers conversion, when it cannot be "
                   "inferred (e.g. SD 2.x eps or v)")
    p.add_argument("--ema", action="store_true", help="replace model weights by their EMA and drop model_ema.*")
    p.add_argument("--drop-ema", action="store_true", help="drop model_ema.* keys")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)

    from ldm.checkpoint import CheckpointError
    from ldm.util import ConfigError

    try:
        args.func(args)
    except (CheckpointError, ConfigError) as err:
        first, *rest = str(err).splitlines()
        print(f"error: {first}", file=sys.stderr)
        for line in rest:  # key-mismatch details, already short and grouped
            print(line, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
