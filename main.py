#!/usr/bin/env python
"""Training entry point (Hydra): ``python main.py experiment=digits trainer.max_steps=2000``.

CompVis' command line works too: ``python main.py --base configs/my-ldm.yaml -t --gpus 0,`` (translated onto
the same Hydra run; see ``ldm.compvis_train``), and the names CompVis code imports from ``main`` exist here.

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
# What CompVis' main.py offered to other code (``from main import instantiate_from_config``, ...).
from ldm.callbacks import CompVisImageLogger as ImageLogger, CUDACallback  # noqa: E402,F401
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: E402,F401
from ldm.util import instantiate_from_config  # noqa: E402,F401

if __name__ == "__main__":
    train()
