"""``pip install .`` gives an importable package with its configs, the demo model and working console commands."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_gives_a_working_package_away_from_the_checkout(tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A real (non-editable) install of this checkout; dependencies are the test venv's own.
    had_build_dir = (ROOT / "build").exists()
    try:
        build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    finally:
        if not had_build_dir:  # setuptools builds in the checkout; leave it as it was
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", LDM_CACHE_DIR=str(tmp_path / "cache"))

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)

    probe = run(sys.executable, "-c", "import ldm, ldm.paths as p; print(ldm.__file__); print(p.CONFIG_DIR); "
                                      "print(ldm.__version__)")
    assert probe.returncode == 0, probe.stderr[-2000:]
    package_file, config_dir, version = probe.stdout.split()
    assert Path(package_file).is_relative_to(target) and Path(config_dir).is_relative_to(target)
    assert (Path(config_dir) / "stable-diffusion" / "v1-inference.yaml").is_file() and version
    assert not (Path(config_dir)).is_symlink()  # a copy, not a link back into the checkout
    helped = run(str(target / "bin" / "ldm-txt2img"), "--help")
    assert helped.returncode == 0 and "usage" in helped.stdout and "--ddim_steps" in helped.stdout, helped.stderr[-2000:]
    for command in ("ldm-train", "ldm-ckpt", "ldm-img2img", "ldm-inpaint"):
        assert (target / "bin" / command).is_file(), command
    # The bundled demo model and the README's relative config names work from another folder.
    made = run(str(target / "bin" / "ldm-txt2img"), "--prompt", "a handwritten digit three", "--n_samples", "1",
               "--n_iter", "1", "--ddim_steps", "2", "--outdir", "out")
    assert made.returncode == 0, made.stderr[-2000:]
    assert (elsewhere / "out" / "samples" / "00000.png").is_file()
    checked = run(str(target / "bin" / "ldm-ckpt"), "check", str(Path(config_dir).parent / "assets" / "digits_demo" /
                                                                   "model.safetensors"),
                  "--config", str(Path(config_dir).parent / "assets" / "digits_demo" / "config.yaml"))
    assert checked.returncode == 0, checked.stderr[-2000:]
    wrong = run(str(target / "bin" / "ldm-train"), "experiment=nope")
    assert wrong.returncode == 2 and "available experiments" in wrong.stderr
