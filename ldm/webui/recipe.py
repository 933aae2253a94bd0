"""A PNG's recipe (its ``ldm`` metadata, see :mod:`ldm.image_io`) read back into a tab of the page."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ldm import settings as declaration
from ldm.image_io import read_metadata
from ldm.webui import form
from ldm.webui.models import ModelManager


@dataclass
class Recipe:
    """What a tab needs to make one recorded image again."""

    task: str
    prompt: str
    values: dict[str, Any]  # form fields (widget values) the recipe sets
    model: Optional[str]  # the model picker's entry for the recorded checkpoint, None when not in the folders
    meta: dict[str, Any]
    init_img: Optional[Path] = None
    mask: Optional[Path] = None
    missing: tuple[str, ...] = ()  # recorded files that are not here (the model, an input image)


def read_recipe(path: Union[str, os.PathLike], manager: ModelManager) -> Recipe:
    """The recipe of ``path`` as form values of its task; one line when the PNG has none or was altered."""
    meta = read_metadata(path)
    task = meta.get("script", "txt2img")
    if task not in form.TASKS:
        raise ValueError(f"{Path(path).name} was made by scripts/{task}.py, which the web UI has no tab for; "
                         f"use scripts/{task}.py --regenerate")
    declaration.check_recipe(meta, task, Path(path).name)
    for key in ("prompt", "seed"):
        if meta.get(key) is None:
            raise ValueError(f"the recipe of {Path(path).name} lacks {key}; it cannot be read back")
    values = {f.name: form.to_widget(f, meta[f.name]) for f in form.fields(task) if f.name in meta}
    values.update(n_samples=1, n_iter=1, fixed_code=False)  # the one recorded image, from its own seed
    missing = []
    model = manager.lookup(str(meta.get("ckpt") or ""), meta.get("model_sha256")) if meta.get("ckpt") else None
    if model is None:
        missing.append(f"the model {meta.get('ckpt')!r}")
    files = {}
    for key in ("init_img", "mask"):
        if meta.get(key):
            if Path(meta[key]).is_file():
                files[key] = Path(meta[key])
            else:
                missing.append(f"the {key.replace('_', ' ')} {meta[key]!r}")
    return Recipe(task, str(meta["prompt"]), values, model, meta, files.get("init_img"), files.get("mask"),
                  tuple(missing))
