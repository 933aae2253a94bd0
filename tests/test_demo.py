"""The bundled demo model: it loads with no arguments and draws the digits it is asked for."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.api import load_model
from ldm.digit_metrics import evaluate_digits

pytestmark = pytest.mark.slow  # subprocess runs of main.py / the scripts, training

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "ldm" / "assets" / "digits_demo"


def test_demo_ships_small_and_complete():
    assert (DEMO / "model.safetensors").stat().st_size < 25 * 2**20
    assert (DEMO / "config.yaml").is_file()


def test_demo_samples_are_recognised_by_an_independent_classifier():
    model = load_model(DEMO / "config.yaml", DEMO / "model.safetensors")
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(DEMO / "config.yaml").sampling
    torch.manual_seed(0)
    result = evaluate_digits(model, per_digit=4, seed=1000, height=defaults.height, width=defaults.width,
                             steps=defaults.steps, guidance_scale=defaults.guidance_scale, sampler=defaults.sampler)
    # A smaller version of the demo's measured accuracy (see ldm/assets/digits_demo/metrics.json).
    assert result["digit_accuracy"] >= 0.75, result["per_digit"]


def test_quick_start_command_uses_the_demo(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts/txt2img.py"), "--prompt", "a handwritten digit seven",
                          "--n_samples", "2", "--n_iter", "1", "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    pngs = sorted((tmp_path / "out" / "samples").glob("*.png"))
    assert len(pngs) == 2
    from ldm.image_io import read_metadata

    meta = read_metadata(pngs[0])
    assert meta["prompt"] == "a handwritten digit seven" and meta["height"] == 16
