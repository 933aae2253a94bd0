#!/usr/bin/env python
"""Inpainting: repaint the white part of --mask in --init-img (9-channel inpainting or ordinary models).

  python scripts/inpaint.py --init-img photo.png --mask mask.png --prompt "a vase of flowers"
      --config configs/stable-diffusion/v1-inpainting-inference.yaml --ckpt sd-v1-5-inpainting.ckpt

Settings: configs/inpaint.yaml. Errors are one line on stderr, exit code 2, nothing written.
"""
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ldm.runner import hydra_task, run_script  # noqa: E402


# An absolute config path also works when this file is imported as a module (tests, other tools).
@hydra.main(config_path=str(ROOT / "configs"), config_name="inpaint", version_base=None)
def main(cfg: DictConfig) -> None:
    hydra_task(cfg, "inpaint")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run with command-line arguments ``argv`` (default: sys.argv[1:]); returns the exit code."""
    return run_script(main, "inpaint", argv)


if __name__ == "__main__":
    sys.exit(run())
