"""File helpers for outputs: atomic writes, and SHA-256 cached so multi-GB checkpoints are hashed once.

The hash cache is ``$LDM_CACHE_DIR/hashes.json`` (default ``~/.cache/ldm/hashes.json``); a damaged or
unwritable cache is ignored rather than failing a run.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def cache_file() -> Path:
    base = os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm"
    return Path(base) / "hashes.json"


def sha256_file(path: PathLike, *, cache: bool = True) -> str:
    """Hex SHA-256 of ``path``; with ``cache``, reused while the file's size and mtime are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    entries = _read_cache() if cache else {}
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if cache:
        entries[key] = {"stamp": stamp, "sha256": value}
        _write_cache(entries)
    return value


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(entries: dict) -> None:
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, json.dumps(entries, indent=1))  # concurrent runs never see a half-written cache
    except OSError:
        pass  # the cache is only an optimisation
