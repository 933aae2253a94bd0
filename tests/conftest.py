import os
import sys
from pathlib import Path

import pytest

# Tests must never reach a model hub: fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _find_reference() -> Path:
    for base in (ROOT, *ROOT.parents):
        candidate = base / "shared" / "reference"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("shared/reference (the official key/shape manifests) not found next to the repository")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _find_reference()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
