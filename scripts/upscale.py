#!/usr/bin/env python
"""SD 2 x4 upscaling: --init-img (low-res) to 4x its size, guided by --prompt.

  python scripts/upscale.py --init-img small.png --prompt "a photo of a cat" --noise_level 20 \
      --config configs/stable-diffusion/x4-upscaling.yaml --ckpt x4-upscaler-ema.safetensors

Settings: configs/upscale.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import upscale_main as main  # noqa: E402,F401  (the Hydra entry, for tools that call it)
from ldm.cli import run_upscale as run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
