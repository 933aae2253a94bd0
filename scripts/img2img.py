#!/usr/bin/env python
"""SDEdit image-to-image: start from --init-img, noised by --strength, and denoise toward the prompt.

  python scripts/img2img.py --init-img sketch.png --prompt "a castle, oil painting" --strength 0.6

Settings: configs/img2img.yaml. Errors are one line on stderr, exit code 2, nothing written.
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
@hydra.main(config_path=str(ROOT / "configs"), config_name="img2img", version_base=None)
def main(cfg: DictConfig) -> None:
    hydra_task(cfg, "img2img")


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Run with command-line arguments ``argv`` (default: sys.argv[1:]); returns the exit code."""
    return run_script(main, "img2img", argv)


if __name__ == "__main__":
    sys.exit(run())
