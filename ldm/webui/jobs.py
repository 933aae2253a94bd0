"""A page request -> the run's settings -> :func:`ldm.runner.prepare` / :func:`~ldm.runner.execute`.

The run is the scripts' own: the same validation (one-line errors), the same PNG writer and recipe, the same
output numbering; only the model comes from :class:`~ldm.webui.models.ModelManager` instead of being loaded
per run. :func:`stream` runs it in a worker thread and hands back progress events (with a decoded preview of
the current denoised estimate now and then) until the images are written; setting the ``cancel`` event makes
the sampling callback raise :class:`Cancelled`, and the run takes back whatever it wrote.
"""
from __future__ import annotations

import hashlib
import io
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from ldm import settings as declaration
from ldm.files import atomic_write
from ldm.image_io import to_pil
from ldm.run_config import Settings
from ldm.runner import RunResult, execute, prepare
from ldm.webui import form
from ldm.webui.models import ModelManager


PREVIEW_SIDE = 256  # previews smaller than this are enlarged to about it


class Cancelled(Exception):
    """The user pressed cancel; the run stops at its next denoising step."""

    def __init__(self) -> None:
        super().__init__("cancelled")


@dataclass
class Request:
    """What one press of "Generate" sends: the task, the pickers, the prompt, the images and every form field."""

    task: str
    model: str
    prompt: str
    values: Mapping[str, Any]  # form fields by setting name, as the widgets give them
    init_image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None  # white (or any drawn pixel) = repaint
    refiner: Optional[str] = None
    vae: Optional[str] = None
    lora: Optional[str] = None  # a LoRA entry of the models folders (its scale is the lora_scale field)


@dataclass
class Event:
    """One report from a running request: progress (fraction done, text, maybe a preview), or the end."""

    kind: str  # "progress" | "done" | "error"
    fraction: float = 0.0
    text: str = ""
    preview: Optional[Image.Image] = None
    result: Optional[RunResult] = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


def save_input(image: Image.Image, folder: Path) -> Path:
    """An uploaded image as a PNG named by its content (written atomically), so its recipe can name it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    return path


def mask_of(drawn: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The repaint mask (white = repaint) of a drawn layer: every pixel with any paint, at ``size`` (w, h)."""
    alpha = np.asarray(drawn.convert("RGBA"))[..., 3] if drawn.mode in ("RGBA", "LA", "PA") or "A" in drawn.getbands() \
        else np.asarray(drawn.convert("L"))
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8), "L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    if not np.asarray(mask).any():
        raise ValueError("the mask is empty: paint the area to repaint on the image")
    return mask


def build_settings(request: Request, manager: ModelManager, outdir: Path) -> Settings:
    """The run's settings: declared defaults, the form's fields, and what the page supplies (model, prompt,
    images saved under ``outdir``, refiner, VAE, LoRA)."""
    task = request.task
    s = Settings(declaration.defaults(task))
    s.update(form.to_settings(task, request.values))
    config, ckpt = manager.model_files(request.model)
    s.update(prompt=request.prompt, config=str(config), ckpt=str(ckpt), outdir=str(outdir / f"{task}-samples"),
             skip_grid=True, skip_save=False)
    if task in ("img2img", "inpaint"):
        if request.init_image is None:
            raise ValueError(f"{task} needs an image: upload one")
        image = request.init_image.convert("RGB")
        s.init_img = str(save_input(image, outdir / "inputs"))
        if task == "inpaint":
            if request.mask is None:
                raise ValueError("the mask is empty: paint the area to repaint on the image")
            s.mask = str(save_input(mask_of(request.mask, image.size), outdir / "inputs"))
    if request.refiner:
        s.refiner_config, s.refiner_ckpt = map(str, manager.model_files(request.refiner))
    if request.vae:
        s.vae = str(manager.find(request.vae, "vae").path)
    if request.lora:
        if "lora" not in s:
            raise ValueError("the settings of this version have no lora; LoRA files cannot be applied")
        s.lora = str(manager.find(request.lora, "lora").path)
    return s


@dataclass
class _Tracker:
    """Overall progress from the per-run step callbacks: runs (sampler calls) expected x their steps."""

    runs: int
    done: int = 0
    last_preview: float = field(default=0.0)

    def fraction(self, info: Mapping[str, Any]) -> float:
        i, total = int(info.get("i", 0)), max(1, int(info.get("total", 1)))
        if i + 1 >= total:
            self.done += 1
            return min(1.0, self.done / self.runs)
        return min(1.0, (self.done + (i + 1) / total) / self.runs)


def _expected_runs(s: Settings) -> int:
    """Sampler calls the run makes: one per batch (per image with batch_invariant), twice with a refiner."""
    images, size = int(s.n_samples) * int(s.n_iter), int(s.batch_size or s.n_samples)
    batches = [min(size, images - k) for k in range(0, images, size)]
    runs = sum(b if s.batch_invariant else 1 for b in batches)
    return max(1, runs) * (2 if s.get("refiner_ckpt") else 1)


def _preview(model: torch.nn.Module, denoised: torch.Tensor) -> Image.Image:
    """The first image of the batch's current denoised estimate, through the model's VAE (small images enlarged,
    pixels kept square, so the page shows them at a visible size)."""
    first = model.first_stage_model
    z = denoised[:1].to(next(first.parameters()).dtype)
    with torch.no_grad():
        image = to_pil(((model.decode_first_stage(z).float() + 1) / 2).clamp(0, 1))
    factor = max(1, PREVIEW_SIDE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def run(request: Request, manager: ModelManager, outdir: Path, report: Any, cancel: threading.Event,
        preview_every: float = 1.0) -> RunResult:
    """Prepare and execute ``request`` (holding the manager's lock), calling ``report(Event)`` as it goes."""
    with manager.lock:
        settings = build_settings(request, manager, outdir)
        job = prepare(settings, request.task, user_keys=settings.keys())
        report(Event("progress", 0.0, "loading the model"))
        model, refiner = manager.get(job.settings, job.config, job.ckpt, job.refiner)
        tracker = _Tracker(_expected_runs(job.settings))

        def on_step(info: dict) -> None:
            if cancel.is_set():
                raise Cancelled()
            fraction = tracker.fraction(info)
            image = None
            now = time.monotonic()
            if preview_every >= 0 and now - tracker.last_preview >= preview_every and info.get("denoised") is not None:
                tracker.last_preview = now
                try:
                    image = _preview(model, info["denoised"])
                except (RuntimeError, ValueError, TypeError):  # a preview never stops the run
                    image = None
            report(Event("progress", fraction, f"step {int(info.get('i', 0)) + 1}/{info.get('total', '?')}", image))

        return execute(job, model, refiner=refiner, progress=False, callback=on_step)


def stream(request: Request, manager: ModelManager, outdir: Path, cancel: threading.Event,
           preview_every: float = 1.0) -> Iterator[Event]:
    """:func:`run` in a worker thread, its events as they come; closing the iterator cancels the run."""
    events: "queue.Queue[Event]" = queue.Queue()
    start = time.monotonic()

    def work() -> None:
        try:
            result = run(request, manager, outdir, events.put, cancel, preview_every)
            events.put(Event("done", 1.0, result=result, seconds=time.monotonic() - start))
        except BaseException as err:  # noqa: BLE001  (handed to the page, which tells the user)
            events.put(Event("error", error=err, seconds=time.monotonic() - start))

    worker = threading.Thread(target=work, name="ldm-webui-run", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            yield event
            if event.kind in ("done", "error"):
                return
    finally:
        if worker.is_alive():
            cancel.set()
        worker.join()
