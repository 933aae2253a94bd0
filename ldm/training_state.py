"""What makes a run resumable exactly: RNG states, data position, atomic checkpoints, SIGTERM.

Lightning restores weights, optimizer, LR schedulers, EMA buffers and loop counters from a
checkpoint. ``ExactResume`` adds the rest: every RNG (torch, CUDA, NumPy, Python) and the position
inside the current epoch's data order, so a resumed run continues with the very same batches
and random draws as an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import os
import random
import signal
from pathlib import Path
from typing import Any, Iterable, Optional

import pytorch_lightning as pl
import numpy as np
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from ldm.files import atomic_output, atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written through :func:`ldm.files.atomic_output` (never torn); read without running code."""

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        from ldm.checkpoint import read_training_checkpoint

        return read_training_checkpoint(path, map_location=map_location)

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            torch.save(checkpoint, tmp)


def _rng_state() -> dict:
    # Plain tensors / ints / tuples only, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(pl.Callback):
    """Save/restore RNG states and the data position; save and stop cleanly on SIGTERM."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.checkpoint_dir = Path(checkpoint_dir)
        self._rng_to_restore: Optional[dict] = None
        self._got_sigterm = False
        self._previous_handler: Any = None

    # -- data position -------------------------------------------------------------------
    @staticmethod
    def _consumed(trainer: pl.Trainer) -> tuple[int, int]:
        """(epoch, samples of that epoch's order already used, over all ranks)."""
        loop = trainer.fit_loop.epoch_loop
        # "processed": a save from on_train_batch_end happens before Lightning marks the batch completed.
        batches = loop.batch_progress.current.processed
        batch_size = trainer.datamodule.batch_size if trainer.datamodule is not None else 0
        return trainer.current_epoch, batches * batch_size * trainer.world_size

    def state_dict(self) -> dict:
        return {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:  # the metrics up to this checkpoint survive a crash right after it
            logger.save()
        epoch, consumed = self._consumed(trainer)
        checkpoint["ldm_resume"] = {"rng": _rng_state(), "epoch": epoch, "consumed": consumed,
                                    "pending_row": _pending_row(trainer)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("ldm_resume")
        if state is None:
            return
        self._rng_to_restore = state["rng"]
        self._pending_row = state.get("pending_row")
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "resume_position"):
            dm.resume_position = (state["epoch"], state["consumed"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restored last, after Lightning and the data pipeline have done their own seeding.
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        row, self._pending_row = getattr(self, "_pending_row", None), None
        if row is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, ResumableCSVLogger) and not logger.experiment.has_row(row["step"], row["values"]):
                    logger.log_metrics(row["values"], step=row["step"])
                    logger.save()

    # -- SIGTERM: finish the current step, save, stop ---------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def handler(signum, frame):
            self._got_sigterm = True

        try:
            self._previous_handler = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
            self._previous_handler = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._got_sigterm:
            trainer.save_checkpoint(self.checkpoint_dir / "last.ckpt")
            print(f"SIGTERM: saved {self.checkpoint_dir / 'last.ckpt'} at step {trainer.global_step}; resume with resume=<run dir>")
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)


def _pending_row(trainer: pl.Trainer) -> Optional[dict]:
    """The step metrics Lightning logs only *after* this batch's checkpoint is written (its loop logs them
    once the batch-end callbacks ran): kept in the checkpoint so a kill in between loses no row."""
    try:
        connector = trainer._logger_connector
        if not connector.should_update_logs:
            return None
        values = {k: float(v) for k, v in connector.metrics["log"].items()}
        return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "values": values} if values else None
    except (AttributeError, KeyError, TypeError, ValueError):  # another Lightning version: rows as Lightning writes them
        return None


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not deleted.

    Rows from ``resume_step`` on (logged after the checkpoint a run resumes from, so logged again)
    and rows torn by a crash are dropped once, atomically; new rows are appended."""

    def __init__(self, log_dir: str, resume_step: Optional[int]) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume_step is None or not path.is_file():
            super()._check_log_dir_exists()  # a new run: Lightning's behaviour (an old file is replaced)
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if None not in r and None not in r.values() and _step(r) is not None]
        kept = [r for r in rows if _step(r) < self._resume_step]
        self.metrics_keys = sorted(header)
        self._write(kept)

    def has_row(self, step: int, keys: Iterable[str]) -> bool:
        """Whether ``metrics.csv`` (or the rows waiting to be written) has values of ``keys`` at ``step``."""
        keys = list(keys)

        def full(row: dict) -> bool:
            return all(row.get(k) not in (None, "") for k in keys)

        if any(int(m.get("step", -1)) == step and full(m) for m in self.metrics):
            return True
        try:
            with open(self.metrics_file_path, newline="") as f:
                return any(_step(r) == step and full(r) for r in csv.DictReader(f))
        except OSError:
            return False

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write(rows, fieldnames)

    def _write(self, rows: list[dict], fieldnames: Optional[list[str]] = None) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fieldnames or self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, buffer.getvalue())  # never a half-rewritten log


def _step(row: dict) -> Optional[int]:
    try:
        return int(float(row.get("step", "")))
    except ValueError:
        return None


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in the run folder, continued across resumes (see :class:`_KeepingWriter`)."""

    def __init__(self, save_dir: str | os.PathLike, resume_step: Optional[int] = None) -> None:
        super().__init__(save_dir, name="", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self._resume_step)
        return self._experiment
