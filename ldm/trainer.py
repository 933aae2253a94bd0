"""Build and run a training job from a composed (Hydra) config: model, data, callbacks, Trainer.

``main.py`` is only the Hydra entry; everything a Python user of training needs is here.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import EMAExport, ImageLogger, SkippedImagesLogger, write_metrics
from ldm.checkpoint import (CheckpointError, check_state_dict, load_into_model, read_state_dict,
                            read_training_checkpoint)
from ldm.data.datamodule import DataModuleFromConfig
from ldm.evaluation import check_evaluation_setup, evaluate_after_fit
from ldm.files import atomic_write, remove_stale_temporaries
from ldm.training_state import AtomicCheckpointIO, ExactResume, ResumableCSVLogger
from ldm.util import ConfigError, instantiate_from_config


def _plain(node: Any) -> dict:
    """A config node (possibly empty or None) as a plain dict."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})


def resolve_resume(resume: Optional[str]) -> tuple[Optional[Path], Optional[Path]]:
    """(checkpoint, run dir) for ``resume=<run dir | .ckpt>``."""
    if not resume:
        return None, None
    path = Path(resume)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume: {ckpt} not found; pass a run directory with checkpoints/last.ckpt or a .ckpt file")
        return ckpt, path
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run_dir
    raise FileNotFoundError(f"resume: {path} does not exist; pass a run directory or a .ckpt file")


def build_model(cfg: DictConfig) -> pl.LightningModule:
    model = instantiate_from_config(cfg.model)
    lr = float(cfg.model.get("base_learning_rate", 1e-4))
    if cfg.get("scale_lr", False):
        accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
        devices = cfg.trainer.get("devices", 1)
        n_dev = devices if isinstance(devices, int) and devices > 0 else 1
        lr = lr * accumulate * n_dev * int(cfg.data.batch_size)
    model.learning_rate = lr
    if cfg.get("init_from"):
        state = read_state_dict(cfg.init_from)
        load_into_model(model, state, strict=True, ignore_keys=("model_ema.",) if not getattr(model, "use_ema", False) else (),
                        optional_keys=("*.embeddings.position_ids", "model_ema.*", "lvlb_weights"))
    if cfg.get("lora"):
        from ldm.lora import add_lora

        add_lora(model, **OmegaConf.to_container(cfg.lora, resolve=True))
        if getattr(model, "use_ema", False):  # track the adapters, which are now the trainable parameters
            from ldm.modules.ema import LitEma

            model.model_ema = LitEma(model.model, decay=float(model.model_ema.decay))
    return model


def check_resume_compatible(model: torch.nn.Module, ckpt: Path, experiment: str) -> int:
    """A clear error when resuming from a checkpoint of another architecture; returns its global step."""
    saved = read_training_checkpoint(ckpt, map_location="meta")
    state = saved["state_dict"]
    try:
        check_state_dict(model, state, strict=True)
    except CheckpointError as err:
        first, *rest = str(err).splitlines()
        raise CheckpointError("\n".join([f"resume: {ckpt} was trained with another architecture than experiment "
                                         f"'{experiment}' ({first.split('(', 1)[-1].split(')')[0]}); resume with the "
                                         "experiment and overrides the run used", *rest])) from None
    return int(saved.get("global_step", 0))


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=int(cfg.checkpoint.every_n_train_steps), save_last=True,
                        enable_version_counter=False,  # last.ckpt is always the latest, also after a resume
                        save_top_k=-1 if cfg.checkpoint.get("keep_all", False) else 1),
        ExactResume(ckpt_dir),
        LearningRateMonitor(logging_interval="step"),
        TQDMProgressBar(refresh_rate=int(cfg.get("progress_refresh", 10))),
        SkippedImagesLogger(),
    ]
    il = cfg.get("image_logger")
    if il and il.get("prompts"):
        opts = OmegaConf.to_container(il, resolve=True)
        callbacks.append(ImageLogger(run_dir / "images", opts.pop("prompts"), every_n_steps=opts.pop("every_n_steps", 0),
                                     **opts))
    for name, spec in _plain(cfg.get("callbacks")).items():
        if spec is not None:  # a null entry switches off one a config named
            callbacks.append(build_extra_callback(str(name), spec, ckpt_dir))
    if cfg.get("export", {}).get("enabled", True):
        sampling = _plain(cfg.export.get("sampling"))
        callbacks.append(EMAExport(run_dir / "export", OmegaConf.to_container(cfg.model, resolve=True), sampling,
                                   cfg.export.get("dtype")))
    return callbacks


# Where ``callbacks:`` entries may come from: Lightning's own callbacks and ours (classes only).
CALLBACK_MODULES = ("pytorch_lightning.callbacks", "ldm.callbacks")


def build_extra_callback(name: str, spec: Any, ckpt_dir: Path) -> pl.Callback:
    """One ``callbacks.<name>: {target, params}`` entry; an extra ModelCheckpoint without ``dirpath``
    writes into ``checkpoints/<name>`` of the run (atomically, like every checkpoint here)."""
    import inspect

    from ldm.util import get_obj_from_str

    if not isinstance(spec, dict) or "target" not in spec:
        raise ConfigError(f"callbacks.{name} must be {{target: ..., params: {{...}}}}, got {spec!r}")
    cls = get_obj_from_str(str(spec["target"]), allow=CALLBACK_MODULES)
    if not (inspect.isclass(cls) and issubclass(cls, pl.Callback)):
        raise ConfigError(f"callbacks.{name}: {spec['target']} is not a Lightning callback class; name one from "
                          f"{' or '.join(CALLBACK_MODULES)}")
    params = dict(spec.get("params") or {})
    if issubclass(cls, ModelCheckpoint) and not params.get("dirpath"):
        params["dirpath"] = str(ckpt_dir / name)
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as err:
        raise ConfigError(f"callbacks.{name}: {err} for {spec['target']}; check the names under params") from None
    return cls(**params)


def build_loggers(cfg: DictConfig, run_dir: Path, resume_step: Optional[int] = None) -> list:
    """CSV (kept across resumes: rows before ``resume_step`` stay) and/or TensorBoard loggers."""
    loggers: list = []
    for name in cfg.get("loggers", ["csv"]):
        if name == "csv":
            loggers.append(ResumableCSVLogger(run_dir, resume_step=resume_step))
        elif name == "tensorboard":
            try:
                from pytorch_lightning.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
            except ModuleNotFoundError:
                print("tensorboard is not installed; logging to CSV only (pip install tensorboard)")
        else:
            raise ConfigError(f"unknown logger {name!r}; use csv and/or tensorboard")
    return loggers


# Extension point: each factory gets (cfg, run_dir) and returns extra callbacks for every run that
# ``train`` builds in this process (e.g. fault injection in tests/debug_hooks.py, or a user's own
# monitoring when calling training from Python). Appending is all it takes.
CALLBACK_FACTORIES: list[Callable[[DictConfig, Path], Iterable[pl.Callback]]] = []


def train(cfg: DictConfig, run_dir: Path, extra_callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fit the configured model; returns the final metrics (also written to ``run_dir/metrics.json``).

    ``extra_callbacks`` (and those of :data:`CALLBACK_FACTORIES`) join the configured ones.
    """
    with warnings.catch_warnings():
        # Frozen first/cond stages are in eval mode on purpose; the batch size is logged explicitly.
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*infer the `batch_size` from an ambiguous collection.*")
        return _train(cfg, run_dir, list(extra_callbacks))


def _train(cfg: DictConfig, run_dir: Path, extra_callbacks: list[pl.Callback]) -> dict[str, Any]:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    ckpt, resume_dir = resolve_resume(cfg.get("resume"))
    run_dir = resume_dir or run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # before any writer of this run exists: every temporary there is a leftover
        for folder in (run_dir, run_dir / "checkpoints"):
            for path in remove_stale_temporaries(folder, keep_live=False):
                print(f"removed {path}, left by an interrupted write")
    model = build_model(cfg)
    resume_step = check_resume_compatible(model, ckpt, str(cfg.get("name", "?"))) if ckpt is not None else None
    data_kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    cache = data_kwargs.pop("cache", None) or {}
    data = DataModuleFromConfig(**data_kwargs)
    data.setup("fit")  # fail fast on data problems (missing folder, batch larger than the dataset)
    check_evaluation_setup(cfg, data)  # a missing FID file or package fails now, not after training
    callbacks = build_callbacks(cfg, run_dir) + extra_callbacks
    for factory in CALLBACK_FACTORIES:
        callbacks.extend(factory(cfg, run_dir))
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), default_root_dir=str(run_dir),
                         callbacks=callbacks, logger=build_loggers(cfg, run_dir, resume_step), plugins=[AtomicCheckpointIO()])
    if cache.get("enabled"):
        use_latent_cache(cfg, model, data, cache, run_dir, device=_root_device(trainer))
    _save_config(cfg, run_dir)
    trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt else None)
    metrics = {k: v for k, v in trainer.callback_metrics.items() if isinstance(v, (torch.Tensor, float, int))}
    metrics["global_step"] = trainer.global_step
    if trainer.world_size == 1 and data.dataset_configs.get("validation") is not None and "val/loss" not in metrics:
        metrics.update({k: v for k, v in (trainer.validate(model, datamodule=data, verbose=False) or [{}])[0].items()})
    metrics.update(evaluate_after_fit(cfg, model, data, trainer))
    if trainer.is_global_zero:
        write_metrics(run_dir / "metrics.json", metrics)
    return metrics


def _root_device(trainer: pl.Trainer) -> torch.device:
    """The device this process trains on (the Trainer's choice), or the CPU if the strategy cannot say yet."""
    try:
        return torch.device(trainer.strategy.root_device)
    except Exception:  # noqa: BLE001 - any strategy that is not set up enough to tell
        return torch.device("cpu")


def use_latent_cache(cfg: DictConfig, model: pl.LightningModule, data: DataModuleFromConfig, cache: dict,
                     run_dir: Path, device: torch.device | str = "cpu") -> Path:
    """Encode the training set once (first stage, and the frozen text encoder) on ``device`` and train from the cache.

    ``device`` should be where the Trainer will train (it moves the whole model there later anyway).
    """
    import json

    from ldm.data.latent_cache import CachedLatentDataset, build_cache

    cache_dir = Path(cache.get("dir") or run_dir / "latent_cache")
    text_encoder_trains = bool((cfg.get("lora") or {}).get("text_encoder", False))
    dataset_id = json.dumps(OmegaConf.to_container(cfg.data.train, resolve=True), sort_keys=True)
    encoders = [m for m in (model.first_stage_model, model.cond_stage_model) if m is not None]
    for m in encoders:
        m.to(device)
    try:
        build_cache(model, data.datasets["train"], cache_dir, dataset_id=dataset_id, flip=bool(cache.get("flip", False)),
                    batch_size=int(cache.get("batch_size", 16)), with_context=not text_encoder_trains)
    finally:
        for m in encoders:
            m.to("cpu")
    data.datasets["train"] = CachedLatentDataset(cache_dir)
    return cache_dir


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
