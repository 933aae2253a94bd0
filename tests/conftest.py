import os
import sys
from pathlib import Path

import pytest

# Tests must never reach a model hub: fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (make test: one per core) each compute on one thread, and so do the processes they
    # start: more threads than cores makes torch's kernels wait on each other.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: runs main.py / a script in a subprocess, or trains (make test-fast skips these)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny tensors
    run faster on one thread than on several waiting on each other on a busy machine, and a server or script
    under test computes its pixels with the same kernels as the test's own reference."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official key/shape manifests, kept in the repository (tests/reference)."""
    return ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def txt2img():
    """scripts/txt2img.py as a module (``txt2img.run(argv)`` returns the exit code)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_conftest_txt2img", ROOT / "scripts" / "txt2img.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_args(tmp_path_factory):
    """``--config``/``--ckpt`` of a tiny random SD 1.x-shaped model saved once per session."""
    import torch

    from ldm.api import build_model, save_model

    config = ROOT / "configs/tiny/tiny-sd1.yaml"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-sd1") / "tiny.safetensors"
    save_model(build_model(config), path)
    return ["--config", str(config), "--ckpt", str(path)]
