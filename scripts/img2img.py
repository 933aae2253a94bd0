#!/usr/bin/env python
"""SDEdit image-to-image: start from --init-img, noised by --strength, and denoise toward the prompt.

  python scripts/img2img.py --init-img sketch.png --prompt "a castle, oil painting" --strength 0.6

Settings: configs/img2img.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.cli import img2img_main as main  # noqa: E402,F401  (the Hydra entry, for tools that call it)
from ldm.cli import run_img2img as run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run())
