#!/usr/bin/env python
"""Text-to-image from prompts (CompVis txt2img flags or Hydra overrides).

  python scripts/txt2img.py --prompt "a red apple" --ddim_steps 25 --n_samples 2
  python scripts/txt2img.py prompt="a red apple" steps=25 sampler=dpmpp_2m
  python scripts/txt2img.py --regenerate outputs/txt2img-samples/samples/00003.png

Settings: configs/txt2img.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import txt2img_main as main  # noqa: E402,F401  (the Hydra entry, for tools that call it)
from ldm.cli import run_txt2img as run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
