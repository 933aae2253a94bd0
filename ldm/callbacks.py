"""Training callbacks: sample grids while training, EMA export for the sampling scripts, metrics."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.files import atomic_write
from ldm.image_io import make_grid, save_png


def save_grid(images: torch.Tensor, path: Path, n_cols: int) -> None:
    """Images [B, 3, H, W] in [0, 1] as one PNG grid (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(make_grid(images.float().cpu(), n_cols), path)


class ImageLogger(pl.Callback):
    """Every ``every_n_steps`` (and at the end), sample ``prompts`` with EMA weights into images/step-N.png."""

    def __init__(self, out_dir: str | os.PathLike, prompts: Sequence[str], every_n_steps: int = 500, seed: int = 0,
                 n_cols: Optional[int] = None, **generate_kwargs: Any):
        self.out_dir, self.prompts, self.every = Path(out_dir), list(prompts), every_n_steps
        self.seed, self.n_cols, self.generate_kwargs = seed, n_cols or min(len(self.prompts), 8), generate_kwargs

    @torch.no_grad()
    def log_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Path]:
        if not trainer.is_global_zero or not self.prompts:
            return None
        from ldm.generation import generate

        was_training = pl_module.training
        pl_module.eval()
        try:
            with pl_module.ema_scope():
                images = generate(pl_module, self.prompts, seeds=[self.seed + i for i in range(len(self.prompts))],
                                  progress=False, batch_invariant=False, **self.generate_kwargs)
        finally:
            pl_module.train(was_training)
        path = self.out_dir / f"step-{trainer.global_step:06d}.png"
        save_grid(images, path, self.n_cols)
        return path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.every > 0 and trainer.global_step % self.every == 0:
            self.log_images(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_images(trainer, pl_module)


def export_for_sampling(pl_module: pl.LightningModule, model_config: Any, out_dir: str | os.PathLike,
                        sampling: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model.safetensors`` (EMA weights when the model has them, no ``model_ema.*``) and the
    ``config.yaml`` (model config with ``use_ema: false`` and sampling defaults) the scripts load directly.

    ``pl_module`` is not modified: a LoRA is merged into copies of the adapted layers, so whatever runs
    after the export (evaluation, more training) sees the very weights training produced.
    """
    from ldm.checkpoint import save_state_dict
    from ldm.lora import has_lora, merged_state_dict, save_lora

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ema = getattr(pl_module, "model_ema", None) if getattr(pl_module, "use_ema", False) else None
    values: dict[str, torch.Tensor] = {}
    if ema is not None:  # EMA weights by parameter name in pl_module
        shadow = dict(ema.named_buffers())
        values = {f"model.{name}": shadow[s_name].detach() for name, s_name in ema.m_name2s_name.items()}
    if has_lora(pl_module):
        # The (EMA) adapters as a LoRA file, and the model with them folded in.
        save_lora(pl_module, out_dir / "lora.safetensors", values=values)
        state = merged_state_dict(pl_module, values)
    else:
        state = {k: v.detach() for k, v in pl_module.state_dict().items()}
        state.update((k, v) for k, v in values.items() if k in state)
    state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    save_state_dict(state, out_dir / "model.safetensors", dtype=dtype)
    cfg = OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.create(model_config), resolve=True)})
    if "use_ema" in (cfg.model.get("params") or {}):  # the file holds the EMA weights as the model's own
        cfg.model.params.use_ema = False
    for key in ("ckpt_path",):
        cfg.model.params.pop(key, None)
    fs = cfg.model.params.get("first_stage_config", {})
    if fs and "params" in fs:
        fs.params.pop("ckpt_path", None)  # the export carries the first stage's weights itself
    if sampling:
        cfg.sampling = sampling
    atomic_write(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    return out_dir / "model.safetensors"


class EMAExport(pl.Callback):
    """At the end of training, export the (EMA) weights + config for the sampling scripts."""

    def __init__(self, out_dir: str | os.PathLike, model_config: Any, sampling: Optional[dict] = None, dtype: Optional[str] = None):
        self.out_dir, self.model_config, self.sampling = Path(out_dir), model_config, sampling
        exportable = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                      "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype and dtype not in exportable:
            raise ValueError(f"export.dtype must be one of float32, float16, bfloat16 (or fp32/fp16/bf16), got {dtype!r}")
        self.dtype = exportable[dtype] if dtype else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the last checkpoint is written; the module is left as training made it.
        if trainer.is_global_zero:
            path = export_for_sampling(pl_module, self.model_config, self.out_dir, self.sampling, self.dtype)
            print(f"exported weights for sampling: {path}")


class SkippedImagesLogger(pl.Callback):
    """Logs how many unreadable images the data pipeline skipped (never fatal, always counted)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "skipped_images"):
            n = dm.skipped_images()
            pl_module.log("data/skipped_images", float(n), rank_zero_only=True)
            if n:
                reports = [ds.skip_report() for ds in dm.datasets.values() if hasattr(ds, "skip_report")]
                print("; ".join(r for r in reports if r))


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    clean = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating, float, int)) else v) for k, v in metrics.items()}
    atomic_write(Path(path), json.dumps(clean, indent=2, sort_keys=True))


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Restore torch's (CPU and ``device``), numpy's and Python's random states on exit."""
    import random

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class CompVisImageLogger(pl.Callback):
    """CompVis' ``main.ImageLogger``: every ``batch_frequency`` batches, grids of ``pl_module.log_images(batch)``.

    Same parameters and file names as CompVis (``<run>/images/<split>/<key>_gs-<step>_e-<epoch>_b-<batch>.png``),
    with the same schedule: powers of two up to the frequency when ``increase_log_steps``, then every
    ``batch_frequency`` (global step, or batch index with ``log_on_batch_idx``). Images are clamped to
    [-1, 1] and rescaled to [0, 1]; grids are written atomically.
    """

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[dict] = None):
        if int(batch_frequency) < 1:
            raise ValueError(f"image_logger.params.batch_frequency must be >= 1, got {batch_frequency!r}")
        self.batch_freq, self.max_images, self.clamp, self.rescale = int(batch_frequency), int(max_images), clamp, rescale
        self.disabled, self.log_on_batch_idx, self.log_first_step = disabled, log_on_batch_idx, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps else []
        self.written: list[Path] = []
        self._val_step = -1

    def due(self, check_idx: int) -> bool:
        return ((check_idx % self.batch_freq == 0 or check_idx in self.log_steps)
                and (check_idx > 0 or self.log_first_step))

    @torch.no_grad()
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str) -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if (self.disabled or self.max_images <= 0 or not self.due(check_idx) or not trainer.is_global_zero
                or not callable(getattr(pl_module, "log_images", None))):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:  # sampling draws noise: the training run's random streams continue as if nothing was logged
            with _rng_kept(pl_module.device):
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        out_dir = Path(trainer.default_root_dir) / "images" / split
        for key, value in images.items():
            if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
                continue
            grid = value.detach().float().cpu()
            grid = grid[None] if grid.dim() == 3 else grid[: self.max_images]
            if self.clamp:
                grid = grid.clamp(-1.0, 1.0)
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            if grid.shape[1] == 1:
                grid = grid.expand(-1, 3, -1, -1)
            if grid.shape[1] != 3:
                continue  # e.g. a 4-channel latent; CompVis logs only image-shaped entries too
            name = f"{key}_gs-{pl_module.global_step:06}_e-{pl_module.current_epoch:06}_b-{batch_idx:06}.png"
            save_grid(grid.clamp(0.0, 1.0), out_dir / name, n_cols=min(4, grid.shape[0]))
            self.written.append(out_dir / name)
        # Lightning's logger "log_images" hook has no PL 2 equivalent: the PNGs are the log.

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        # CompVis logs every validation batch of a due step; one batch per step is the picture at a fraction of the cost.
        if not trainer.sanity_checking and pl_module.global_step > 0 and self._val_step != pl_module.global_step:
            self._val_step = pl_module.global_step
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class CUDACallback(pl.Callback):
    """CompVis' ``main.CUDACallback``: per-epoch wall time and peak CUDA memory (prints nothing off CUDA)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        self.device = pl_module.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        peak_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        epoch_s = time.time() - self.start_time
        if trainer.is_global_zero:
            print(f"Average Epoch time: {epoch_s:.2f} seconds; Average Peak memory {peak_mib:.2f}MiB")
