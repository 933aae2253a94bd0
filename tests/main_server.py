#!/usr/bin/env python
"""Run ``main.py`` many times without paying its imports each time: import once, fork per run.

Started by :func:`tests.helpers.run_main_py` (one server per test process). Each request is a JSON line
``{"argv": [...], "cwd": ..., "env": {...}, "out": ..., "err": ...}``; the server forks, and the child
(a fresh process for everything the run does: warnings, Hydra, Lightning state) sets the environment and
working directory, sends its stdout / stderr to the two files and runs ``main.py``'s entry with ``argv``.
The reply is ``{"rc": exit code}``. Torch has not run any operation before the fork, so no thread pool
is copied in a half-held state.
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402,F401  (the imports every run needs, paid once)
import pytorch_lightning  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import ldm.cli  # noqa: E402
import ldm.trainer  # noqa: E402,F401
import ldm.models.diffusion.ddpm  # noqa: E402,F401


def child(request: dict) -> None:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(ROOT / "main.py"), *request["argv"]]
    code = 0
    try:
        ldm.cli.train()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001  (report like an uncaught exception would)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
