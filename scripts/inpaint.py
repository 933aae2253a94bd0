#!/usr/bin/env python
"""Inpainting: repaint the white part of --mask in --init-img (9-channel inpainting or ordinary models).

  python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "a vase of flowers"
      --config configs/stable-diffusion/v1-inpainting-inference.yaml --ckpt sd-v1-5-inpainting.ckpt

Settings: configs/inpaint.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import inpaint_main as main  # noqa: E402,F401  (the Hydra entry, for tools that call it)
from ldm.cli import run_inpaint as run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
