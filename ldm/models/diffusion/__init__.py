"""Diffusion models. ``DiffusionEngine`` (SDXL) is also reachable here, where ``sgm`` configs name it."""
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "DiffusionEngine":
        from ldm.models.diffusion.engine import DiffusionEngine

        return DiffusionEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
