"""Where the package's own files are: the configs (``configs/`` in a checkout, installed as ``ldm/configs``)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# An installed package carries the configs inside it; a source checkout (also ``pip install -e .``) has them
# next to the package.
CONFIG_DIR = next((d for d in (_PACKAGE / "configs", _PACKAGE.parent / "configs") if (d / "train.yaml").is_file()),
                  _PACKAGE.parent / "configs")


def bundled(path: str | Path) -> Path:
    """``path`` if it exists; else, for a relative ``configs/...`` name, the bundled config of that name (so the
    README's ``--config configs/stable-diffusion/...`` works from any folder once the package is installed)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts
    if parts and parts[0] == "configs" and (CONFIG_DIR.joinpath(*parts[1:])).exists():
        return CONFIG_DIR.joinpath(*parts[1:])
    return p
