"""File helpers for outputs: atomic writes (one helper for every writer), and SHA-256 cached so multi-GB checkpoints are hashed once.

The hash cache is ``$LDM_CACHE_DIR/hashes.json`` (default ``~/.cache/ldm/hashes.json``); a damaged or
unwritable cache is ignored rather than failing a run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
TEMP_MARK = ".tmp-"
# ".NAME.tmp-<pid>-<random>" (and the older ".NAME.tmp-<pid>" of checkpoint writes before atomic_output).
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)(?:-[0-9a-f]+)?$")


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


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; once the block succeeds, make it ``path`` durably.

    The one way outputs are written: readers never see a partial file, a crash leaves at most a
    temporary recognisable by :func:`remove_stale_temporaries`, and files get the usual
    ``0o666 & ~umask`` mode (safetensors and mkstemp create owner-only files). On failure the
    temporary is removed and any previous ``path`` is unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_output`: never a partial file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def remove_stale_temporaries(folder: PathLike, *, keep_live: bool = True) -> list[Path]:
    """Delete the leftovers of :func:`atomic_output` writers that died (e.g. ``kill -9`` mid-checkpoint).

    With ``keep_live`` a temporary survives while its writer's pid is alive (and not this process);
    ``keep_live=False`` removes them all, for a run starting up in a folder it owns.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        if keep_live and _alive(int(match.group(1))):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: it would be inside atomic_output
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_dir(folder: Path) -> None:
    """Persist a rename; not every filesystem (or OS) lets a directory be opened and synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
