"""``torch.load`` for checkpoints that pickle a few harmless non-tensor objects, without running them.

Official ``.ckpt`` files (SD 1.x and Lightning training checkpoints) carry, next to their tensors,
objects that ``weights_only=True`` refuses: the Lightning ``ModelCheckpoint`` class (a dict key in
``callbacks``), numpy scalars and dtypes (monitored scores), sometimes OmegaConf hyper-parameters.
We never need those objects, so we let the restricted unpickler build them in a form that runs no
code of theirs:

* numpy scalars, dtypes and arrays are rebuilt by numpy's own constructors (data, not code);
* any class or function under a *known, inert* module prefix (Lightning, OmegaConf, ``typing``)
  becomes a fresh placeholder class that only stores the arguments it is given.

Everything else (``os.system``, ``builtins.eval``, any other package) is still refused by torch's
``weights_only`` unpickler; :func:`load` reports such a file by the global it references.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Module prefixes whose pickled classes are replaced by inert placeholders.
INERT_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_MAX_RETRIES = 64


class Placeholder:
    """Stands in for a pickled object whose class we do not run; keeps what it was given, inert."""

    pickled_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickled_name}>"


def _placeholder(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (Placeholder,), {"pickled_name": name, "__module__": __name__})


def _numpy_globals() -> dict[str, Any]:
    """numpy's data constructors under the names old (numpy.core) and new (numpy._core) pickles use."""
    out: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    core = getattr(np, "_core", None) or getattr(np, "core")
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}.scalar"] = core.multiarray.scalar
        out[f"{mod}._reconstruct"] = core.multiarray._reconstruct
    for dtype_class in vars(getattr(np, "dtypes", object)).values():
        if isinstance(dtype_class, type) and issubclass(dtype_class, np.dtype):
            out[f"numpy.dtypes.{dtype_class.__name__}"] = dtype_class
    return out


def harmless_global(name: str) -> Any | None:
    """What the unpickler may use for the global ``name``, or None if it stays refused."""
    numpy_objects = _numpy_globals()
    if name in numpy_objects:
        return numpy_objects[name]
    if name.startswith(INERT_PREFIXES):
        return _placeholder(name)
    return None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or a damaged file: the load itself will tell
        return []


def load(path: Path, map_location: Any, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` allowing :func:`harmless_global` names; other globals raise
    :class:`pickle.UnpicklingError` naming them (as torch does)."""
    allowed: dict[str, Any] = _numpy_globals()  # all of them: unpickling a dtype builds its DType class too

    def admit(names: list[str]) -> bool:
        new = False
        for name in names:
            if name not in allowed and (obj := harmless_global(name)) is not None:
                allowed[name], new = obj, True
        return new

    admit(_unsafe_globals(path))
    for _ in range(_MAX_RETRIES):
        try:
            with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            found = _GLOBAL.findall(str(err))
            if not found or not admit(found):
                raise
    raise pickle.UnpicklingError(f"{path}: too many distinct pickled classes")
