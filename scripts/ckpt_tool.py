#!/usr/bin/env python
"""Inspect, check and convert Stable Diffusion checkpoints safely (installed: ``ldm-ckpt``); see ldm/ckpt_tool.py.

  python scripts/ckpt_tool.py inspect  FILE
  python scripts/ckpt_tool.py check    FILE --config configs/stable-diffusion/v1-inference.yaml [--ema]
  python scripts/ckpt_tool.py convert  IN OUT.safetensors [--ema] [--dtype fp16] [--drop-ema]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.ckpt_tool import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
