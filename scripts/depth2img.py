#!/usr/bin/env python
"""SD 2 depth-to-image: a new image with --init-img's depth (MiDaS-estimated, or --depth-map), guided by --prompt.

  python scripts/depth2img.py --init-img room.png --prompt "a cozy log cabin interior" --strength 0.8 \
      --config configs/stable-diffusion/v2-midas-inference.yaml --ckpt 512-depth-ema.ckpt

Settings: configs/depth2img.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import depth2img_main as main  # noqa: E402,F401  (the Hydra entry, for tools that call it)
from ldm.cli import run_depth2img as run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
