#!/usr/bin/env python
"""Text-to-image from prompts (CompVis txt2img flags or Hydra overrides).

  python scripts/txt2img.py --prompt "a red apple" --ddim_steps 25 --n_samples 2
  python scripts/txt2img.py prompt="a red apple" steps=25 sampler=dpmpp_2m
  python scripts/txt2img.py --regenerate outputs/txt2img-samples/samples/00003.png

Settings: configs/txt2img.yaml. Errors are one line on stderr, exit code 2, nothing written.
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
@hydra.main(config_path=str(ROOT / "configs"), config_name="txt2img", version_base=None)
def main(cfg: DictConfig) -> None:
    hydra_task(cfg, "txt2img")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run with command-line arguments ``argv`` (default: sys.argv[1:]); returns the exit code."""
    return run_script(main, "txt2img", argv)


if __name__ == "__main__":
    sys.exit(run())
