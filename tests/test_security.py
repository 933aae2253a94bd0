"""Configs, checkpoints and recipes are data: nothing in them runs code, touches files or reads the environment.

Every payload here would create a marker file (or leak an environment variable) if it ran; the
tests assert the marker never appears and the entry points answer with one ``error:`` line.
"""
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.api import build_model, load_config, load_model, save_model
from ldm.checkpoint import CheckpointError, checkpoint_metadata, read_state_dict
from ldm.files import sha256_file
from ldm.image_io import read_metadata, save_png
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config, load_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
SECRET = "s3cr3t-value-from-the-environment"
FAST = ["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_security_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Payload:
    """Pickles as a call to os.system: running the pickle creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_ckpt(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 1, "payload": Payload(marker)}, path)
    return path


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LDM_TEST_SECRET", SECRET)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(build_model(TINY), path)
    return path


@pytest.fixture(scope="module")
def scripts():
    return {name: _load_script(name) for name in ("txt2img", "ckpt_tool")}


# ---- config targets ----------------------------------------------------------------------------
def _payload_targets(tmp: Path, marker: Path) -> list[dict]:
    hub = tmp / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef x():\n    return 1\n")
    evil = evil_ckpt(tmp / "evil.ckpt", marker)
    return [
        {"target": "torch.utils.collect_env.run", "params": {"command": f"touch {marker}"}},
        {"target": "torch.distributed.run.main", "params": {"args": ["--help"]}},
        {"target": "torch.hub.load", "params": {"repo_or_dir": str(hub), "model": "x", "source": "local"}},
        {"target": "torch.load", "params": {"f": str(evil), "weights_only": False}},
        {"target": "torch.save", "params": {"obj": 1, "f": str(marker)}},
        {"target": "ldm.checkpoint.read_state_dict", "params": {"path": str(evil), "allow_unsafe_pickle": True}},
        {"target": "ldm.files.atomic_write", "params": {"path": str(marker), "data": "x"}},
        {"target": "ldm.data.image_folder.Path", "params": {}},  # a class, but not one of ours
        {"target": "ldm.models.diffusion.ddpm.torch", "params": {}},  # a module
        {"target": "os.system", "params": {"command": f"touch {marker}"}},
        {"target": "builtins.eval", "params": {}},
        {"target": "subprocess.Popen", "params": {"args": ["touch", str(marker)]}},
        {"target": "sgm.util.anything", "params": {}},  # sgm names resolve only through the alias table
    ]


def test_config_targets_cannot_run_code_or_touch_files(tmp_path):
    marker = tmp_path / "marker"
    for config in _payload_targets(tmp_path, marker):
        with pytest.raises(ConfigError) as err:
            instantiate_from_config(config)
        msg = str(err.value)
        assert "\n" not in msg and config["target"] in msg, msg
        assert not marker.exists(), f"{config['target']} ran"


def test_allowed_classes_still_build_and_are_checked():
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    opt = instantiate_from_config({"target": "torch.optim.SGD", "params": {"lr": 0.1}},
                                  params=[torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ConfigError, match="has no parameter 'in_feature'"):
        instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_feature": 3, "out_features": 2}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        instantiate_from_config({"target": "torch.nn.Identity", "params": [1, 2]})
    with pytest.raises(ConfigError, match="not a class"):
        get_obj_from_str("ldm.modules.diffusionmodules.util.timestep_embedding")


def _tiny_config_with(tmp_path: Path, lossconfig: dict) -> Path:
    cfg = OmegaConf.load(TINY)
    cfg.model.params.first_stage_config.params.lossconfig = lossconfig  # nested deep inside the model
    path = tmp_path / "hostile.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    return path


def test_hostile_nested_target_through_every_entry_point(tmp_path, tiny_ckpt, scripts, capsys):
    marker = tmp_path / "marker"
    hostile = _tiny_config_with(tmp_path, {"target": "torch.utils.collect_env.run",
                                           "params": {"command": f"touch {marker}"}})
    assert scripts["ckpt_tool"].main(["check", str(tiny_ckpt), "--config", str(hostile)]) == 2
    assert "torch.utils.collect_env.run" in capsys.readouterr().err
    out = tmp_path / "out"
    assert scripts["txt2img"].run(["--prompt", "x", "--config", str(hostile), "--ckpt", str(tiny_ckpt),
                                   "--outdir", str(out), *FAST]) == 2
    # A PNG whose recipe names the hostile YAML (everything else valid).
    png = tmp_path / "recipe.png"
    save_png(torch.zeros(3, 32, 32), png, {"prompt": "x", "seed": 1, "config": str(hostile), "ckpt": str(tiny_ckpt),
                                           "model_sha256": sha256_file(tiny_ckpt), "script": "txt2img",
                                           "height": 32, "width": 32, "steps": 2})
    assert scripts["txt2img"].run(["--regenerate", str(png), "--outdir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err
    assert not marker.exists() and not out.exists()


def test_yaml_alias_bomb_and_recursion_are_refused(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 600
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb") as err:
        load_config(bomb)
    assert time.perf_counter() - start < 5 and "\n" not in str(err.value)
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError):
        load_yaml(recursive)
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &base {x: 1}\nother: *base\n")  # ordinary anchors still work
    assert load_yaml(ok).other.x == 1


# ---- pickles -----------------------------------------------------------------------------------
def test_code_carrying_ckpt_never_runs_through_any_reader(tmp_path):
    marker = tmp_path / "marker"
    evil = evil_ckpt(tmp_path / "evil.ckpt", marker)
    for read in (read_state_dict, checkpoint_metadata):
        with pytest.raises(CheckpointError, match="posix.system"):
            read(evil)
    with pytest.raises(CheckpointError):
        load_model(TINY, evil)
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_a_code_carrying_ckpt_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    evil_ckpt(run / "last.ckpt", marker)
    from tests.helpers import run_main_py

    res = run_main_py(["experiment=tiny", f"resume={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'new'}",
                       "progress_refresh=0"], cwd=tmp_path,
                      env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr and "posix.system" in res.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_official_sd1_style_ckpt_loads_without_unsafe_pickle(tmp_path, monkeypatch):
    """sd-v1-4.ckpt pickles Lightning's ModelCheckpoint class (a dict key) and numpy scalars (numpy.core names)."""
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    scalar = getattr(np, "_core", np).multiarray.scalar
    monkeypatch.setattr(scalar, "__module__", "numpy.core.multiarray")  # the name numpy 1.x files carry
    torch.manual_seed(0)
    model = build_model(TINY)
    obj = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
           "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.25),
                                           "current_score": np.float32(0.5), "dirpath": "/fsx/logs"}},
           "state_dict": model.state_dict()}
    path = tmp_path / "sd-v1-style.ckpt"
    torch.save(obj, path)
    monkeypatch.undo()
    raw = path.read_bytes()
    assert b"numpy.core.multiarray\nscalar" in raw and b"pytorch_lightning.callbacks.model_checkpoint" in raw
    loaded = load_model(TINY, path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert checkpoint_metadata(path)["global_step"] == 470000


# ---- recipes and prompts are literal -----------------------------------------------------------
def _no_secret_anywhere(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"{f} holds an interpolated environment value"


@pytest.mark.parametrize("argv", [
    ["--prompt", "${oc.env:LDM_TEST_SECRET}", "--neg", "x ${oc.env:LDM_TEST_SECRET}"],
    ["prompt='${oc.env:LDM_TEST_SECRET}'", 'negative_prompt="${oc.env:LDM_TEST_SECRET}"'],
])
def test_command_line_prompts_are_literal(tmp_path, tiny_ckpt, scripts, argv):
    out = tmp_path / "out"
    assert scripts["txt2img"].run([*argv, "--config", str(TINY), "--ckpt", str(tiny_ckpt), "--outdir", str(out),
                                   *FAST]) == 0
    meta = read_metadata(out / "samples" / "00000.png")
    assert meta["prompt"] == "${oc.env:LDM_TEST_SECRET}"
    assert meta["negative_prompt"].endswith("${oc.env:LDM_TEST_SECRET}")
    assert OmegaConf.load(out / "config.yaml").prompt == "${oc.env:LDM_TEST_SECRET}"  # reads back literally
    _no_secret_anywhere(out)


@pytest.mark.slow
def test_prompt_files_and_png_recipes_are_literal(tmp_path, tiny_ckpt, scripts):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("${oc.env:LDM_TEST_SECRET}\n")
    out = tmp_path / "out"
    assert scripts["txt2img"].run(["--from-file", str(prompts), "--config", str(TINY), "--ckpt", str(tiny_ckpt),
                                   "--outdir", str(out), *FAST]) == 0
    assert read_metadata(out / "samples" / "00000.png")["prompt"] == "${oc.env:LDM_TEST_SECRET}"
    png = tmp_path / "forged.png"
    save_png(torch.zeros(3, 32, 32), png, {
        "prompt": "${oc.env:LDM_TEST_SECRET} ${oc.env:PATH}", "negative_prompt": "${oc.env:HOME}", "seed": 3,
        "config": str(TINY), "ckpt": str(tiny_ckpt), "model_sha256": sha256_file(tiny_ckpt), "script": "txt2img",
        "height": 32, "width": 32, "steps": 2})
    again = tmp_path / "again"
    assert scripts["txt2img"].run(["--regenerate", str(png), "--outdir", str(again)]) == 0
    meta = read_metadata(again / "samples" / "00000.png")
    assert meta["prompt"] == "${oc.env:LDM_TEST_SECRET} ${oc.env:PATH}" and meta["negative_prompt"] == "${oc.env:HOME}"
    _no_secret_anywhere(again)
    assert os.environ["PATH"] not in (again / "config.yaml").read_text()


@pytest.mark.parametrize("field,value", [("seed", 42.7), ("compile", "yes"), ("prompt", ["a", "b"]),
                                         ("steps", "2"), ("guidance_scale", float("nan")), ("use_ema", 1)])
def test_recipe_fields_are_type_checked(tmp_path, tiny_ckpt, scripts, capsys, field, value):
    recipe = {"prompt": "x", "seed": 3, "config": str(TINY), "ckpt": str(tiny_ckpt),
              "model_sha256": sha256_file(tiny_ckpt), "script": "txt2img", "height": 32, "width": 32, "steps": 2,
              field: value}
    png = tmp_path / "bad.png"
    save_png(torch.zeros(3, 32, 32), png, recipe)
    assert scripts["txt2img"].run(["--regenerate", str(png), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and repr(field) in err
    assert not (tmp_path / "out").exists()
