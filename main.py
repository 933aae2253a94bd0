#!/usr/bin/env python
"""Training entry point (Hydra): ``python main.py experiment=digits trainer.max_steps=2000``.

Sweeps: ``python main.py -m experiment=tiny model.base_learning_rate=1e-4,1e-3``.
Resume: ``python main.py experiment=digits resume=logs/digits/<run>``.
Everything but the entry lives in ``ldm.trainer``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from ldm.cli_errors import guarded, run_or_exit  # noqa: E402


@hydra.main(config_path="configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from ldm.trainer import train

    metrics = guarded(train, cfg, Path(HydraConfig.get().runtime.output_dir))
    loss = metrics.get("val/loss", metrics.get("train/loss"))
    return float(loss) if loss is not None else None  # what an Optuna sweeper minimises


if __name__ == "__main__":
    run_or_exit(main, config_dir=ROOT / "configs", config_name="train")
