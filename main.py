#!/usr/bin/env python
"""Training entry point (Hydra): ``python main.py experiment=digits trainer.max_steps=2000``.

Sweeps: ``python main.py -m experiment=tiny model.base_learning_rate=1e-4,1e-3``.
Resume: ``python main.py experiment=digits resume=logs/digits/<run>``.
Everything but the entry lives in ``ldm.trainer`` (installed: the ``ldm-train`` command).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from ldm.cli import train, train_main as main  # noqa: E402,F401  (main: the Hydra entry, for tools that call it)

if __name__ == "__main__":
    train()
