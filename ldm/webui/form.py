"""The settings declaration (:mod:`ldm.settings`) as form fields, and form values back into settings.

Every declared setting of a task becomes one field, except those the page supplies in its own way
(:data:`PAGE_OWNED`). A field's widget follows the declared type: choices -> dropdown, bool -> checkbox,
int/float -> number (empty = null where the setting may be null), a (height, width) pair -> "H,W" text.
Nothing here imports gradio.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ldm import settings as declaration

TASKS = ("txt2img", "img2img", "inpaint")

# Settings the page fills itself, and how.
PAGE_OWNED = {
    "prompt": "the prompt box",
    "from_file": "one prompt per request",
    "config": "the model picker",
    "ckpt": "the model picker",
    "refiner_ckpt": "the refiner picker (SDXL)",
    "refiner_config": "the refiner picker (SDXL)",
    "vae": "the VAE picker",
    "lora": "the LoRA rows",
    "init_img": "the image input",
    "mask": "the mask drawn on the image",
    "regenerate": "the PNG info tab",
    "outdir": "the server's --outdir",
    "skip_save": "the gallery shows the saved PNGs",
    "skip_grid": "the gallery shows the saved PNGs",
    "n_rows": "the gallery lays out the images",
}
# Shown first, the rest under "Advanced"; SDXL's own settings (their help starts with "SDXL") in an SDXL section,
# lora_* next to the LoRA picker.
MAIN = ("negative_prompt", "sampler", "steps", "guidance_scale", "seed", "width", "height", "strength", "n_samples",
        "n_iter")
NULL_CHOICE = "(default)"  # a dropdown's entry for null (a setting whose null means "the sampler's own", ...)


@dataclass(frozen=True)
class Field:
    """One form field: a declared setting and the widget that edits it."""

    name: str
    widget: str  # "text" | "integer" | "number" | "checkbox" | "dropdown" | "pair"
    nullable: bool
    default: Any
    help: str
    choices: tuple[str, ...]
    group: str  # "main" | "lora" | "sdxl" | "advanced"

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


def _widget(d: declaration.Declared) -> str:
    if d.spec.choices is not None or (d.kind is bool and d.nullable):
        return "dropdown"
    return {bool: "checkbox", int: "integer", float: "number", list: "pair"}.get(d.kind, "text")


def fields(task: str) -> list[Field]:
    """The form fields of ``task``, in declaration order."""
    if task not in TASKS:
        raise ValueError(f"the web UI has no task {task!r}; use one of {', '.join(TASKS)}")
    out = []
    for d in declaration.declared(task):
        if d.name in PAGE_OWNED:
            continue
        choices = tuple(d.spec.choices()) if d.spec.choices is not None else ("true", "false") if d.kind is bool else ()
        if choices and d.nullable:
            choices = (NULL_CHOICE, *choices)
        group = ("sdxl" if d.spec.help.startswith("SDXL") else "main" if d.name in MAIN
                 else "lora" if d.name.startswith("lora") else "advanced")
        out.append(Field(d.name, _widget(d), d.nullable, d.default, d.spec.help, choices, group))
    return out


def initial_values(task: str, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Each field's starting value: the declared default, or the model config's ``sampling:`` default."""
    return {f.name: to_widget(f, model_defaults.get(f.name, f.default)) for f in fields(task)}


def model_default_values(task: str, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a model may give defaults for, at that model's values (declared defaults where it has none)."""
    names = {d.name for d in declaration.declared(task) if d.spec.model_default}
    return {f.name: to_widget(f, model_defaults.get(f.name, f.default)) for f in fields(task) if f.name in names}


def to_widget(field: Field, value: Any) -> Any:
    """A setting's value as its widget shows it."""
    if field.widget == "pair":
        return "" if value is None else f"{value[0]},{value[1]}"
    if field.widget == "dropdown":
        return NULL_CHOICE if value is None else ("true" if value else "false") if isinstance(value, bool) else value
    if field.widget == "text":
        return "" if value is None else str(value)
    return value


def _number(field: Field, value: Any) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{field.name} expects a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field.name} expects {'an integer' if field.widget == 'integer' else 'a number'}, "
                         f"got {value!r}") from None
    if field.widget == "integer":
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{field.name} expects an integer, got {value!r}")
        return int(number)
    return number


def _pair(field: Field, value: Any) -> Optional[list[int]]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        text = str(value).strip().strip("[]()")
        if not text:
            return None
        parts = [p for p in re.split(r"[,x\s]+", text) if p]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"{field.name} expects two non-negative integers like 1024,1024, got {value!r}")
    return [int(parts[0]), int(parts[1])]


def from_widget(field: Field, value: Any) -> Any:
    """A widget's value as the setting's value (type checks and ranges are the declaration's, later)."""
    if field.widget in ("integer", "number"):
        number = _number(field, value)
        if number is None and not field.nullable:
            raise ValueError(f"{field.name} must be set (default {field.default!r})")
        return number
    if field.widget == "pair":
        pair = _pair(field, value)
        if pair is None and not field.nullable:
            raise ValueError(f"{field.name} must be set, e.g. {field.default[0]},{field.default[1]}")
        return pair
    if field.widget == "dropdown":
        if value in (None, NULL_CHOICE) and field.nullable:
            return None
        if field.choices[-2:] == ("true", "false") and value in ("true", "false"):  # a bool that may be null
            return value == "true"
        return value
    if field.widget == "checkbox":
        if not isinstance(value, bool):
            raise ValueError(f"{field.name} expects true or false, got {value!r}")
        return value
    text = "" if value is None else str(value)
    return None if field.nullable and not text.strip() else text


def to_settings(task: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Form values (every field of ``task``, by name) as settings; one line naming the first bad field."""
    by_name = {f.name: f for f in fields(task)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"{task} has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(by_name)}")
    missing = [name for name in by_name if name not in values]
    if missing:
        raise ValueError(f"{task}: the request lacks {', '.join(missing)}")
    return {name: from_widget(field, values[name]) for name, field in by_name.items()}


def field_names(task: str, groups: Sequence[str] = ("main", "lora", "sdxl", "advanced")) -> list[str]:
    return [f.name for f in fields(task) if f.group in groups]
