import os
import sys
from pathlib import Path

import pytest

# Tests must never reach a model hub: fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs main.py / a script in a subprocess, or trains (make test-fast skips these)")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official key/shape manifests, kept in the repository (tests/reference)."""
    return ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
