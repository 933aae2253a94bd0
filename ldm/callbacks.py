"""Training callbacks: sample grids while training, EMA export for the sampling scripts, metrics."""
from __future__ import annotations

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
