"""Command-line error handling shared by ``main.py`` and the scripts: one line, exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn

# Errors a user can fix from the command line; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    from ldm.checkpoint import CheckpointError
    from ldm.util import ConfigError

    # Lightning's MisconfigurationException: e.g. gradient clipping asked of a manually optimized model.
    return (*USER_ERRORS, ConfigError, CheckpointError, OmegaConfBaseException, MisconfigurationException)


def first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def check_overrides(config_dir: Path, config_name: str, overrides: list[str]) -> None:
    """Compose the config once up front so unknown experiments/keys fail with one line, not a trace."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            compose(config_name, overrides=overrides)
    except MissingConfigException as err:
        group = getattr(err, "config_name", None) or ""
        options = sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))
        fail(f"{first_line(err)}; available experiments: {', '.join(options)}" if "experiment" in str(err) or "experiment" in group
             else first_line(err))
    except HydraException as err:
        msg = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        fail(f"{msg}; check the key name in configs/{config_name}.yaml (add new keys with '+key=value')")


def run_or_exit(hydra_main: Callable[[], object], config_dir: Path, config_name: str) -> None:
    """Run a Hydra main: validate single-run overrides first; user errors print one line and exit 2."""
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info") or a.startswith("--")
               for a in args):
        check_overrides(config_dir, config_name, [a for a in args if "=" in a or a.startswith("~")])
    hydra_main()


def guarded(fn: Callable, *args, **kwargs):
    """Call ``fn``; a user error becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except user_errors() as err:
        fail(first_line(err))
