#!/usr/bin/env python
"""``main.py`` with the test hooks of tests/debug_hooks.py registered: same arguments, same Hydra main.

This script stays ``sys.argv[0]``, so DDP ranks that Lightning re-launches run it (and get the hooks) too;
``HYDRA_MAIN_MODULE`` makes Hydra look for ``configs/`` next to main.py, as when main.py is run directly.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402
from ldm.cli_errors import run_or_exit  # noqa: E402
from tests.debug_hooks import register  # noqa: E402

if __name__ == "__main__":
    os.environ["HYDRA_MAIN_MODULE"] = "__main__"
    register()
    run_or_exit(main.main, config_dir=ROOT / "configs", config_name="train")
