"""scripts/txt2img.py, img2img.py, inpaint.py on tiny random models: outputs, metadata, flags, regeneration, errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image

from ldm.api import build_model, save_model
from ldm.files import sha256_file
from ldm.image_io import read_metadata, save_png
from ldm.run_config import translate_argv

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
TINY_INPAINT = ROOT / "configs/tiny/tiny-sd1-inpainting.yaml"
FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_iter", "1"]
FIELDS = {"prompt", "negative_prompt", "seed", "sampler", "steps", "guidance_scale", "guidance_rescale", "eta",
          "discretization", "height", "width", "precision", "config", "ckpt", "model_sha256", "ldm_version", "script"}
WEIRD_PROMPT = """a "quoted", comma'd prompt = with ${dollar} and \\ back\\'slash, [list]"""


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: _load_script(name) for name in ("txt2img", "img2img", "inpaint")}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny checkpoints (random weights), their configs, and a config carrying ``sampling:`` defaults."""
    base = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for name, config in (("sd", TINY), ("inpaint", TINY_INPAINT)):
        save_model(build_model(config), base / f"{name}.safetensors")
        out[name] = ["--ckpt", str(base / f"{name}.safetensors"), "--config", str(config)]
    with_defaults = base / "tiny-with-defaults.yaml"
    defaults = "sampling: {height: 32, width: 32, steps: 2, sampler: euler, guidance_scale: 3.0}\n"
    with_defaults.write_text(TINY.read_text() + defaults)
    out["defaults"] = ["--ckpt", str(base / "sd.safetensors"), "--config", str(with_defaults)]
    return out


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(base / "init.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(base / "mask.png")
    Image.fromarray(mask[:32]).save(base / "mask_small.png")
    (base / "broken.png").write_bytes(b"this is not an image")
    (base / "prompts.txt").write_text("a red square\n\n  a blue circle  \n")
    (base / "blank.txt").write_text("  \n\t\n")
    return base


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_txt2img_compvis_flags_grid_config_and_regeneration(scripts, models, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--from-file", str(inputs / "prompts.txt"), "--n_samples", "2", "--seed", "7", "--scale=3.5",
            "--precision", "full", "--outdir", str(out), *FAST, *models["sd"]]
    assert scripts["txt2img"].run(argv) == 0
    samples = sorted((out / "samples").iterdir())
    assert [p.name for p in samples] == [f"{i:05d}.png" for i in range(4)]
    assert (out / "grid-0000.png").is_file() and (out / "config.yaml").is_file()
    assert Image.open(out / "grid-0000.png").size == (4 * 34 + 2, 34 + 2)  # one row per iteration
    metas = [read_metadata(p) for p in samples]
    assert FIELDS <= set(metas[0]) and "strength" not in metas[0]
    assert [m["prompt"] for m in metas] == ["a red square"] * 2 + ["a blue circle"] * 2
    assert [m["seed"] for m in metas] == [7, 8, 9, 10]
    m = metas[2]
    assert (m["sampler"], m["steps"], m["guidance_scale"], m["height"], m["precision"]) == ("ddim", 2, 3.5, 32, "fp32")
    assert m["model_sha256"] == sha256_file(models["sd"][1]) and m["script"] == "txt2img"
    assert "Seed: 9" in Image.open(samples[2]).info["parameters"]
    assert "steps: 2" in (out / "config.yaml").read_text()
    assert str(out) in capsys.readouterr().out

    # The 3rd image alone, from its metadata only, into the same outdir: numbering continues. It was made in a
    # batch of two, so it comes back up to the kernels' rounding (at most one 8-bit level here).
    assert scripts["txt2img"].run(["--regenerate", str(samples[2]), "--outdir", str(out)]) == 0
    again = out / "samples" / "00004.png"
    diff = np.abs(pixels(again).astype(int) - pixels(samples[2]).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05
    assert read_metadata(again) == m
    assert not (out / "grid-0001.png").exists()

    # batch_invariant=true: every image computed on its own, so its recipe regenerates it bit for bit.
    exact = tmp_path / "exact"
    assert scripts["txt2img"].run([*argv[:-len(models["sd"])], "batch_invariant=true", "--outdir", str(exact),
                                   *models["sd"]]) == 0
    made = sorted((exact / "samples").iterdir())
    assert read_metadata(made[3])["batch_invariant"] is True
    assert scripts["txt2img"].run(["--regenerate", str(made[3]), "--outdir", str(exact)]) == 0
    assert np.array_equal(pixels(exact / "samples" / "00004.png"), pixels(made[3]))


def test_plms_fixed_code_prompt_survives_and_model_defaults(scripts, models, tmp_path):
    out = tmp_path / "out"
    argv = [f"--prompt={WEIRD_PROMPT}", "--plms", "--fixed_code", "--n_samples", "2", "--n_iter", "1", "--skip_grid",
            "--ddim_steps", "3", "--outdir", str(out), *models["defaults"]]
    assert scripts["txt2img"].run(argv) == 0
    a, b = sorted((out / "samples").iterdir())
    meta = read_metadata(a)
    assert meta["prompt"] == WEIRD_PROMPT
    assert (meta["sampler"], meta["steps"]) == ("plms", 3)  # the user's flags beat the model's defaults
    assert (meta["height"], meta["guidance_scale"]) == (32, 3.0)  # the model's defaults beat the scripts'
    assert read_metadata(b)["seed"] == meta["seed"] == 42
    assert np.array_equal(pixels(a), pixels(b))  # same prompt, same code
    assert not list(out.glob("grid-*.png"))


def test_flag_translation_keeps_odd_values():
    parser = OverridesParser.create()
    for argv in (["--prompt", WEIRD_PROMPT], [f"--prompt={WEIRD_PROMPT}"], [f"prompt={WEIRD_PROMPT}"]):
        (override,) = translate_argv("txt2img", argv)
        value = parser.parse_override(override).value()
        assert OmegaConf.create({"prompt": value}).prompt == WEIRD_PROMPT
    assert translate_argv("img2img", ["--H=64", "--W", "48", "--precision", "full", "--init-img", "a b.png", "--plms",
                                      "--skip_grid", "--use_ema=false", "--neg", "blurry"]) == [
        "height=64", "width=48", "precision='fp32'", "init_img='a b.png'", "sampler='plms'", "skip_grid=true",
        "use_ema=false", "negative_prompt='blurry'"]
    # Hydra's own flags pass through; CompVis --C/--f are read from the model config instead.
    assert translate_argv("txt2img", ["--cfg", "job", "--C", "4", "--f=8", "steps=3"]) == ["--cfg", "job", "steps=3"]
    for bad, message in ((["--H", "abc"], "integer"), (["--bogus", "1"], "unknown option"), (["--prompt"], "needs a value"),
                         (["--mask", "m.png"], "not an option of txt2img"), (["foo=1"], "unknown setting"),
                         (["a cat"], "unexpected argument")):
        with pytest.raises(ValueError, match=message):
            translate_argv("txt2img", bad)


def test_img2img_and_regeneration_from_recorded_inputs(scripts, models, inputs, tmp_path):
    out = tmp_path / "out"
    argv = ["--init-img", str(inputs / "init.png"), "--strength", "0.5", "--prompt", "a photo", "--n_samples", "1",
            "--outdir", str(out), *FAST, "--ddim_steps", "4", *models["sd"]]
    assert scripts["img2img"].run(argv) == 0
    (sample,) = (out / "samples").iterdir()
    meta = read_metadata(sample)
    assert (meta["strength"], meta["width"], meta["script"]) == (0.5, 32, "img2img")
    assert meta["init_img"] == str(inputs / "init.png") and meta["init_img_sha256"] == sha256_file(inputs / "init.png")
    assert (out / "grid-0000.png").is_file() and "strength: 0.5" in (out / "config.yaml").read_text()
    assert scripts["img2img"].run([f"regenerate={sample}", "--outdir", str(tmp_path / "again")]) == 0
    assert np.array_equal(pixels(tmp_path / "again/samples/00000.png"), pixels(sample))


@pytest.mark.parametrize("model", ["inpaint", "sd"])
def test_inpaint_nine_channel_and_ordinary_models(scripts, models, inputs, tmp_path, model):
    out = tmp_path / "out"
    argv = ["--init-img", str(inputs / "init.png"), "--mask", str(inputs / "mask.png"), "--prompt", "a cat",
            "--n_samples", "1", "--outdir", str(out), *FAST, *models[model]]
    assert scripts["inpaint"].run(argv) == 0
    (sample,) = (out / "samples").iterdir()
    meta = read_metadata(sample)
    assert FIELDS <= set(meta) and meta["mask_sha256"] == sha256_file(inputs / "mask.png")
    assert Image.open(sample).size == (32, 32) and (out / "grid-0000.png").is_file() and (out / "config.yaml").is_file()


INIT, MASK = ["--init-img", "{inputs}/init.png"], ["--mask", "{inputs}/mask_small.png"]
BAD_INPUTS = {
    "size": ("txt2img", ["--prompt", "x", "--H", "30"], "height must be a positive multiple of 8"),
    "strength": ("img2img", ["--prompt", "x", *INIT, "--strength", "1.5"], "strength must be in [0, 1]"),
    "missing_init": ("img2img", ["--prompt", "x", "--init-img", "{inputs}/nope.png"], "not found"),
    "unreadable_init": ("img2img", ["--prompt", "x", "--init-img", "{inputs}/broken.png"], "cannot read init image"),
    "mask_size": ("inpaint", ["--prompt", "x", *INIT, *MASK], "must match"),
    "sampler": ("txt2img", ["--prompt", "x", "sampler=nope"], "sampler must be one of ddim"),
    "empty_prompt_file": ("txt2img", ["--from-file", "{inputs}/blank.txt"], "has no prompts"),
    "no_prompt": ("txt2img", [], "no prompt"),
    "eta_on_euler": ("txt2img", ["--prompt", "x", "--sampler", "euler", "--ddim_eta", "0.5"], "takes no eta"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_writes_nothing(scripts, models, inputs, tmp_path, capsys, case):
    task, argv, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = [a.replace("{inputs}", str(inputs)) for a in argv] + ["--outdir", str(out), *models["sd"]]
    assert scripts[task].run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_bad_input_leaves_an_existing_outdir_unchanged(scripts, models, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.png").write_bytes(b"old")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert scripts["txt2img"].run(["--prompt", "x", "--W", "33", "--outdir", str(out), *models["sd"]]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "samples" / "00000.png").read_bytes() == b"old"


def test_model_resolution_errors(scripts, models, tmp_path, capsys, monkeypatch):
    import ldm.run_config as rc

    monkeypatch.setattr(rc, "DEMO_CKPT", tmp_path / "no-demo.safetensors")
    out = str(tmp_path / "out")
    assert scripts["txt2img"].run(["--prompt", "x", "--outdir", out]) == 2
    assert "pass --ckpt and --config" in capsys.readouterr().err
    assert scripts["txt2img"].run(["--prompt", "x", "--outdir", out, "--ckpt", models["sd"][1]]) == 2
    assert "README.md" in capsys.readouterr().err
    assert not Path(out).exists()


def test_regeneration_refuses_a_changed_checkpoint(scripts, models, tmp_path, capsys):
    png = tmp_path / "old.png"
    meta = {"prompt": "x", "seed": 1, "config": str(TINY), "ckpt": models["sd"][1], "model_sha256": "0" * 64,
            "script": "txt2img", "height": 32, "width": 32, "steps": 2}
    save_png(torch.zeros(3, 32, 32), png, meta)
    assert scripts["txt2img"].run(["--regenerate", str(png), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "has changed since" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert scripts["img2img"].run(["--regenerate", str(png), "--outdir", str(tmp_path / "out")]) == 2
    assert "scripts/txt2img.py" in capsys.readouterr().err


def test_hash_cache(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    digest = sha256_file(f)
    assert digest == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    entry = json.loads((Path(os.environ["LDM_CACHE_DIR"]) / "hashes.json").read_text())[str(f.resolve())]
    assert entry["sha256"] == digest


@pytest.mark.parametrize("script,argv", [
    ("txt2img.py", ["--prompt", "a cat", "--H", "100"]),
    ("img2img.py", ["--prompt", "a cat", "--init-img", "missing.png"]),
])
@pytest.mark.slow
def test_cli_errors_have_no_traceback(models, tmp_path, script, argv):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *argv, "--outdir", str(out), *models["sd"]],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert not out.exists()
