"""The settings declaration (ldm/settings.py) drives the Hydra schema, CompVis flags, validation and the recipe."""
import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm import settings
from ldm.api import build_model
from ldm.image_io import read_metadata
from ldm.run_config import translate_argv
from ldm.settings import RunSettings, between, setting

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1"]


@pytest.fixture
def dummy(monkeypatch, tmp_path):
    """A new setting declared in one place only: a field of a RunSettings subclass."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    knob = setting(0.5, "a knob only this test knows", flags=("dk",), check=between(0, 1))
    cls = dataclasses.make_dataclass("DummyRunSettings", [("dummy_knob", float, knob)], bases=(RunSettings,))
    monkeypatch.setattr(settings, "RUN_SETTINGS", cls)
    yield
    monkeypatch.undo()
    settings.register_configs()  # the real schema again for later tests in this process


def test_a_new_setting_appears_everywhere(dummy, txt2img, model_args, tmp_path, capsys):
    # CompVis-style flag and Hydra key, type-checked.
    assert translate_argv("txt2img", ["--dk", "0.7"]) == ["dummy_knob=0.7"]
    assert translate_argv("txt2img", ["dummy_knob=0.25"]) == ["dummy_knob=0.25"]
    with pytest.raises(ValueError, match="expects a number"):
        translate_argv("txt2img", ["--dk", "much"])
    assert "dummy_knob" in settings.help_text("txt2img")
    # Hydra schema with its default.
    settings.register_configs()
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        assert compose("txt2img").dummy_knob == 0.5
    # Validation, before anything is written.
    out = tmp_path / "out"
    base = ["--prompt", "a knob", *FAST, *model_args, "--outdir", str(out)]
    assert txt2img.run([*base, "--dk", "2"]) == 2
    assert "dummy_knob must be in [0, 1], got 2.0" in capsys.readouterr().err and not out.exists()
    # The PNG recipe and config.yaml record it ...
    assert txt2img.run([*base, "--dk", "0.7"]) == 0
    meta = read_metadata(out / "samples" / "00000.png")
    assert meta["dummy_knob"] == 0.7 and "dummy_knob: 0.7" in (out / "config.yaml").read_text()
    # ... and --regenerate restores it (the user does not pass it again).
    again = tmp_path / "again"
    assert txt2img.run(["--regenerate", str(out / "samples" / "00000.png"), "--outdir", str(again)]) == 0
    assert read_metadata(again / "samples" / "00000.png") == meta


def test_recipe_and_validation_follow_the_declaration():
    assert "strength" in settings.recipe_fields("img2img") and "strength" not in settings.recipe_fields("txt2img")
    assert "outdir" not in settings.recipe_fields("txt2img") and "seed" in settings.recipe_fields("txt2img")
    assert settings.defaults("img2img")["height"] is None and settings.defaults("txt2img")["height"] == 512
    found = settings.problems({"steps": 0, "guidance_scale": float("nan"), "sampler": "nope", "height": 30})
    assert found == ["sampler must be one of " + ", ".join(settings._sampler_names()) + ", got 'nope'",
                     "steps must be at least 1, got 0", "guidance_scale must be a finite number, got nan",
                     "height must be a positive multiple of 8, got 30 (try 32)"]
    assert settings.problems({"steps": 80}, timesteps=50) == ["steps must be at most the model's 50 training timesteps, got 80"]


def test_generate_takes_the_declared_settings_and_refuses_unknown_names():
    from ldm.generation import generate

    model = build_model(TINY).eval()
    opts = settings.SamplingSettings(steps=2, height=32, width=32)
    a = generate(model, ["x"], opts, seeds=[1], progress=False)
    b = generate(model, ["x"], seeds=[1], steps=2, height=32, width=32, progress=False)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="'stepz'"):
        generate(model, ["x"], seeds=[1], stepz=2)
    with pytest.raises(ValueError, match="strength must be in"):
        generate(model, ["x"], opts, seeds=[1], strength=3.0)
