"""The checkpoint folders the page picks from, and the one model it holds.

A folder's ``.safetensors`` / ``.ckpt`` files are sorted by what their keys say: models (listed in the model
and refiner pickers), LoRA files and standalone VAEs. A model's config is, in this order: ``NAME.yaml`` next
to ``NAME.safetensors``, ``config.yaml`` in the same folder (the bundled demo's layout), or the bundled config
of the architecture its keys show (SD 1.x / 2.x / SDXL base / refiner / inpainting). A ``.ckpt`` is not opened
to guess: it needs one of the first two.

One model (plus its SDXL refiner) is loaded at a time: loading another frees the previous one first.
"""
from __future__ import annotations

import gc
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ldm.api import guess_architecture, load_config, load_model
from ldm.files import sha256_file
from ldm.generation import prepare_for_inference
from ldm.paths import CONFIG_DIR
from ldm.run_config import DEMO_CKPT, Settings, model_sampling_defaults
from ldm.vae_file import replace_vae

SUFFIXES = (".safetensors", ".ckpt")
GUESSED_CONFIGS = {  # guess_architecture() -> bundled config; SD 2.x v-prediction (768) models need NAME.yaml
    "SD 1.x": "stable-diffusion/v1-inference.yaml",
    "SD 1.x inpainting": "stable-diffusion/v1-inpainting-inference.yaml",
    "SD 2.x": "stable-diffusion/v2-inference.yaml",
    "SD 2.x inpainting": "stable-diffusion/v2-inpainting-inference.yaml",
    "SDXL": "stable-diffusion/sdxl-base.yaml",
    "SDXL refiner": "stable-diffusion/sdxl-refiner.yaml",
}


@dataclass(frozen=True)
class Checkpoint:
    """A file of a models folder: what it is, and for a model the config it loads with."""

    name: str  # as the pickers show it: "<folder>/<path inside the folder>"
    path: Path
    kind: str  # "model" | "lora" | "vae" | "upscaler"
    config: Optional[Path]  # models only; None: no config found (choosing it says how to add one)
    architecture: str


def _safetensors_shapes(path: Path) -> Optional[dict[str, tuple]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001  (an unreadable file is listed as a model; loading it says what is wrong)
        return None


def _classify(path: Path) -> tuple[str, str]:
    """(kind, architecture) of a checkpoint file from its key names (safetensors headers only)."""
    if path.suffix != ".safetensors":
        return "model", "a pickled checkpoint"
    shapes = _safetensors_shapes(path)
    if shapes is None:
        return "model", "an unreadable file"
    if any(".lora_down." in k or ".lora_up." in k or k.endswith((".lora_down.weight", ".lora_A.weight")) for k in shapes):
        return "lora", "LoRA"
    architecture = guess_architecture(shapes)
    if architecture == "SDXL" and not any(k.startswith("conditioner.embedders.1.") for k in shapes):
        architecture = "SDXL refiner"
    if architecture == "a standalone autoencoder" or (architecture == "an unknown architecture"
                                                      and any(k.startswith(("decoder.", "first_stage_model.decoder."))
                                                              for k in shapes)
                                                      and not any("diffusion_model" in k for k in shapes)):
        return "vae", "VAE"
    if architecture.endswith("x4 upscaler"):
        return "upscaler", architecture
    return "model", architecture


def _config_for(path: Path, architecture: str) -> Optional[Path]:
    for candidate in (path.with_suffix(".yaml"), path.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    guessed = GUESSED_CONFIGS.get(architecture)
    return CONFIG_DIR / guessed if guessed else None


def scan(folders: Sequence[Path]) -> list[Checkpoint]:
    """Every checkpoint under ``folders`` (recursively, sorted; missing folders are skipped)."""
    found: list[Checkpoint] = []
    seen: set[Path] = set()
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            kind, architecture = _classify(path)
            config = _config_for(path, architecture) if kind == "model" else None
            name = f"{folder.resolve().name}/{path.relative_to(folder).as_posix()}"
            found.append(Checkpoint(name, path.absolute(), kind, config, architecture))
    return found


@dataclass(frozen=True)
class LoadKey:
    """What makes one loaded model differ from another: a change reloads."""

    config: str
    ckpt: str
    device: str
    use_ema: bool
    precision: str
    compile: bool
    vae: Optional[str]
    refiner: Optional[tuple[str, str]]
    channels_last: Optional[bool]


class ModelManager:
    """The models folders and the one model loaded from them (thread-safe: one load or run at a time)."""

    def __init__(self, folders: Sequence[Path]):
        self.folders = [Path(f) for f in folders]
        self.lock = threading.RLock()
        self.model: Optional[torch.nn.Module] = None
        self.refiner: Optional[torch.nn.Module] = None
        self.key: Optional[LoadKey] = None
        self.checkpoints: list[Checkpoint] = []
        self.refresh()

    def refresh(self) -> list[Checkpoint]:
        self.checkpoints = scan(self.folders)
        return self.checkpoints

    def names(self, kind: str = "model") -> list[str]:
        return [c.name for c in self.checkpoints if c.kind == kind]

    def default_name(self) -> str:
        """The bundled demo model's entry (the page starts on it), else the first model found."""
        for c in self.checkpoints:
            if c.path == DEMO_CKPT.absolute():
                return c.name
        models = self.names()
        if not models:
            raise ValueError(f"no model found in {', '.join(map(str, self.folders))}; add .safetensors files "
                             "(with NAME.yaml beside them) or pass --models-dir")
        return models[0]

    def find(self, name: str, kind: str = "model") -> Checkpoint:
        for c in self.checkpoints:
            if c.name == name and c.kind == kind:
                return c
        raise ValueError(f"no {kind} named {name!r} in the models folders; press refresh or check --models-dir")

    def model_files(self, name: str) -> tuple[Path, Path]:
        """(config, checkpoint) of a model entry; one line when it has no config."""
        c = self.find(name)
        if c.config is None:
            raise ValueError(f"{c.path.name} ({c.architecture}) has no config: put its model YAML next to it as "
                             f"{c.path.with_suffix('.yaml').name}")
        return c.config, c.path

    def lookup(self, ckpt: str, sha256: Optional[str]) -> Optional[str]:
        """The model entry of a recorded checkpoint: the same path, else a file with the same SHA-256."""
        models = [c for c in self.checkpoints if c.kind == "model"]
        for c in models:
            if str(c.path) == str(Path(ckpt).absolute()):
                return c.name
        if sha256:
            for c in models:
                if sha256_file(c.path) == sha256:
                    return c.name
        return None

    def sampling_defaults(self, name: str) -> dict[str, Any]:
        config, _ = self.model_files(name)
        return model_sampling_defaults(config)

    def is_sdxl(self, name: str) -> bool:
        config, _ = self.model_files(name)
        return "conditioner_config" in load_config(config).get("params", {})

    def free(self) -> None:
        """Drop the loaded model(s) and give their memory back."""
        with self.lock:
            self.model = self.refiner = self.key = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, settings: Any, config: Path, ckpt: Path,
            refiner: Optional[tuple[Path, Path]] = None) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
        """The model (and refiner) for a prepared run's ``settings``: the loaded one, or loaded now (the previous
        one freed first), prepared the way :func:`ldm.runner.execute` prepares a model it loads itself (a run's
        LoRA and textual-inversion tokens are the runner's: added for that run only)."""
        load_on = "cpu" if settings.get("offload", "none") != "none" else settings.device
        key = LoadKey(str(config), str(ckpt), str(load_on), bool(settings.use_ema), settings.precision,
                      bool(settings.get("compile", False)), settings.get("vae"),
                      tuple(map(str, refiner)) if refiner else None, settings.get("channels_last"))
        with self.lock:
            if self.key == key and self.model is not None:
                return self.model, self.refiner
            self.free()
            model = load_model(config, ckpt, device=load_on, use_ema=bool(settings.use_ema))
            second = load_model(*refiner, device=load_on, share_from=model) if refiner else None
            if key.vae:
                replace_vae(model, key.vae)
                if second is not None:
                    second.first_stage_model = model.first_stage_model
            for part in (model, second):
                if part is not None:
                    _prepare(part, key)
            self.model, self.refiner, self.key = model, second, key
            return model, second

    def load(self, name: str, device: str) -> torch.nn.Module:
        """Load a model entry as it samples by default (fp32, no VAE/LoRA/refiner): switching models in the page."""
        from ldm.runner import _device  # noqa: PLC0415

        config, ckpt = self.model_files(name)
        settings = {"device": _device(device), "use_ema": False, "precision": "fp32", "offload": "none"}
        model, _ = self.get(Settings(settings), config, ckpt)
        return model


def _prepare(model: torch.nn.Module, key: LoadKey) -> None:
    options = dict(compile=key.compile, half_vae=bool(key.vae))
    if "channels_last" in inspect.signature(prepare_for_inference).parameters:  # a setting newer than this module
        options["channels_last"] = key.channels_last
    prepare_for_inference(model, key.precision, **options)


__all__ = ["Checkpoint", "LoadKey", "ModelManager", "scan"]
