"""Fault injection and cross-rank checks for training tests (not part of the package).

Switched on by environment variables, which DDP's re-launched ranks inherit:
``LDM_TEST_KILL_AT_STEP`` (SIGKILL before that step, like a crash), ``LDM_TEST_SIGTERM_AT_STEP``
(SIGTERM while the next step runs, like a pre-emption), ``LDM_TEST_DUMP_CHECKSUMS=1`` (per-rank
weight sums in ``checksums-rank<N>.json``), ``LDM_TEST_KILL_DURING_SAVE=N`` (SIGKILL halfway through
writing the N-th checkpoint file), ``LDM_TEST_KILL_AFTER_SAVE=N`` (SIGKILL right after the N-th checkpoint
file is in place, before Lightning logs that batch's metrics). :func:`register` adds them to ``ldm.trainer``.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl

from ldm.callbacks import write_metrics


class DebugHooks(pl.Callback):
    def __init__(self, run_dir: Path, kill_at_step: Optional[int] = None, dump_checksums: bool = False,
                 sigterm_at_step: Optional[int] = None):
        self.run_dir, self.kill_at_step, self.dump_checksums = run_dir, kill_at_step, dump_checksums
        self.sigterm_at_step = sigterm_at_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.kill_at_step is not None and trainer.global_step >= self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # like a crash: no cleanup, no final checkpoint
        if self.sigterm_at_step is not None and trainer.global_step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step sigterm_at_step + 1 runs

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dump_checksums:
            sums = {k: float(v.double().sum()) for k, v in pl_module.state_dict().items() if v.is_floating_point()}
            write_metrics(self.run_dir / f"checksums-rank{trainer.global_rank}.json", sums)


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value else None


def hooks_from_env(cfg: Any, run_dir: Path) -> list[pl.Callback]:
    """A ``ldm.trainer.CALLBACK_FACTORIES`` entry: DebugHooks as the environment asks, else nothing."""
    kill, term = _int_env("LDM_TEST_KILL_AT_STEP"), _int_env("LDM_TEST_SIGTERM_AT_STEP")
    dump = os.environ.get("LDM_TEST_DUMP_CHECKSUMS", "") not in ("", "0")
    if kill is None and term is None and not dump:
        return []
    return [DebugHooks(run_dir, kill, dump, term)]


def _kill_after_save(n: int) -> None:
    """SIGKILL as soon as the n-th checkpoint file is complete (the batch's metrics are not logged yet)."""
    from ldm.training_state import AtomicCheckpointIO

    original, count = AtomicCheckpointIO.save_checkpoint, [0]

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        original(self, checkpoint, path, storage_options)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    AtomicCheckpointIO.save_checkpoint = save_checkpoint


def _kill_during_save(n: int) -> None:
    """Make the n-th checkpoint write die halfway: a torn temporary file, then SIGKILL."""
    import torch

    from ldm.files import atomic_output
    from ldm.training_state import AtomicCheckpointIO

    original, count = AtomicCheckpointIO.save_checkpoint, [0]

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        count[0] += 1
        if count[0] == n:
            with atomic_output(Path(path)) as tmp:
                torch.save(checkpoint, tmp)
                with open(tmp, "r+b") as f:
                    f.truncate(tmp.stat().st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        original(self, checkpoint, path, storage_options)

    AtomicCheckpointIO.save_checkpoint = save_checkpoint


def register() -> None:
    from ldm import trainer

    if hooks_from_env not in trainer.CALLBACK_FACTORIES:
        trainer.CALLBACK_FACTORIES.append(hooks_from_env)
    if _int_env("LDM_TEST_KILL_DURING_SAVE"):
        _kill_during_save(_int_env("LDM_TEST_KILL_DURING_SAVE"))
    if _int_env("LDM_TEST_KILL_AFTER_SAVE"):
        _kill_after_save(_int_env("LDM_TEST_KILL_AFTER_SAVE"))
