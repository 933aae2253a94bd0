"""Evaluation of a trained model after ``trainer.fit``: digit accuracy and FID, configured by ``cfg.evaluate``.

Kept apart from the training loop so the metrics can be computed (or extended) without knowing how
the run was built; :func:`check_evaluation_setup` runs before training so a bad setup fails early.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError


def _plain(node: Any) -> dict:
    """A config node (possibly empty or None) as a plain dict."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def check_evaluation_setup(cfg: DictConfig, data: Any) -> None:
    """Fail before training (not after hours of it) when the FID weights or validation images are missing."""
    fid = _plain(cfg.get("evaluate", {}).get("fid"))
    if not fid.get("weights"):
        return
    from ldm.fid import check_fid_setup

    check_fid_setup(fid["weights"])
    n_val = len(data.datasets["validation"]) if "validation" in data.datasets else 0
    if n_val < int(fid.get("num_samples", 100)):
        raise ConfigError(f"evaluate.fid needs {fid.get('num_samples', 100)} validation images to compare with, "
                          f"the validation set has {n_val}; lower evaluate.fid.num_samples or add data.validation")


def evaluate_after_fit(cfg: DictConfig, model: pl.LightningModule, data: Any, trainer: pl.Trainer) -> dict[str, Any]:
    """The ``cfg.evaluate`` metrics of ``model`` (EMA weights), computed on global rank zero only."""
    metrics: dict[str, Any] = {}
    ev = cfg.get("evaluate") or {}
    if not trainer.is_global_zero:
        return metrics
    if ev.get("digits", False):
        from ldm.digit_metrics import evaluate_digits

        with model.ema_scope():
            result = evaluate_digits(model.eval(), per_digit=int(ev.get("per_digit", 10)),
                                     **_plain(ev.get("sampling")))
        metrics["digit_accuracy"] = result["digit_accuracy"]
        metrics.update({f"digit_accuracy/{k}": v for k, v in result["per_digit"].items()})
    fid = _plain(ev.get("fid"))
    if fid.get("weights"):
        from ldm.fid import evaluate_fid

        sampling = {**_plain(ev.get("sampling")), **(fid.pop("sampling", None) or {})}
        with model.ema_scope():
            metrics["fid"] = evaluate_fid(model.eval(), data, fid.pop("weights"), sampling=sampling, **fid)
    return metrics
