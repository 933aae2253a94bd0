"""Console commands (``ldm-txt2img``, ``ldm-img2img``, ``ldm-inpaint``, ``ldm-upscale``, ``ldm-depth2img``,
``ldm-train``, ``ldm-ckpt``).

The same entry points as ``scripts/*.py`` and ``main.py`` in a checkout; installed, they work from any folder.
Each returns / exits with 0 on success and 2 on a user error (one line on stderr).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

from ldm.paths import CONFIG_DIR


@hydra.main(config_path=str(CONFIG_DIR), config_name="txt2img", version_base=None)
def txt2img_main(cfg: DictConfig) -> None:
    from ldm.runner import hydra_task

    hydra_task(cfg, "txt2img")


@hydra.main(config_path=str(CONFIG_DIR), config_name="img2img", version_base=None)
def img2img_main(cfg: DictConfig) -> None:
    from ldm.runner import hydra_task

    hydra_task(cfg, "img2img")


@hydra.main(config_path=str(CONFIG_DIR), config_name="inpaint", version_base=None)
def inpaint_main(cfg: DictConfig) -> None:
    from ldm.runner import hydra_task

    hydra_task(cfg, "inpaint")


@hydra.main(config_path=str(CONFIG_DIR), config_name="upscale", version_base=None)
def upscale_main(cfg: DictConfig) -> None:
    from ldm.runner import hydra_task

    hydra_task(cfg, "upscale")


@hydra.main(config_path=str(CONFIG_DIR), config_name="depth2img", version_base=None)
def depth2img_main(cfg: DictConfig) -> None:
    from ldm.runner import hydra_task

    hydra_task(cfg, "depth2img")


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def train_main(cfg: DictConfig) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from ldm.cli_errors import guarded
    from ldm.trainer import train as run_training

    metrics = guarded(run_training, cfg, Path(HydraConfig.get().runtime.output_dir))
    loss = metrics.get("val/loss", metrics.get("train/loss"))
    return float(loss) if loss is not None else None  # what an Optuna sweeper minimises


def _task(main, task: str, argv: Optional[Sequence[str]]) -> int:
    from ldm.runner import run_script

    return run_script(main, task, argv)


def run_txt2img(argv: Optional[Sequence[str]] = None) -> int:
    return _task(txt2img_main, "txt2img", argv)


def run_img2img(argv: Optional[Sequence[str]] = None) -> int:
    return _task(img2img_main, "img2img", argv)


def run_inpaint(argv: Optional[Sequence[str]] = None) -> int:
    return _task(inpaint_main, "inpaint", argv)


def run_upscale(argv: Optional[Sequence[str]] = None) -> int:
    return _task(upscale_main, "upscale", argv)


def run_depth2img(argv: Optional[Sequence[str]] = None) -> int:
    return _task(depth2img_main, "depth2img", argv)


def txt2img() -> None:
    sys.exit(run_txt2img())


def img2img() -> None:
    sys.exit(run_img2img())


def inpaint() -> None:
    sys.exit(run_inpaint())


def upscale() -> None:
    sys.exit(run_upscale())


def depth2img() -> None:
    sys.exit(run_depth2img())


def train() -> None:
    from ldm.cli_errors import run_or_exit
    from ldm.compvis_train import is_compvis_argv

    if is_compvis_argv(sys.argv[1:]):  # CompVis' spelling: --base a.yaml -t --gpus 0, ...
        from ldm.compvis_train import run

        run(sys.argv[1:])
        return
    run_or_exit(train_main, config_dir=CONFIG_DIR, config_name="train")


def ckpt() -> None:
    from ldm.ckpt_tool import main

    sys.exit(main())
