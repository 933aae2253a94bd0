"""Seeded random mutation of checkpoint bytes, model YAMLs, PNG recipe fields and CLI values.

Whatever the input, an entry point ends with exit code 0 or 2 (one ``error:`` line), never a
traceback, never runs a payload (marker file), and leaves no output behind when it fails. The
case counts are printed (``pytest -s``) and fixed by the seeds below.
"""
import importlib.util
import io
import json
import random
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.api import build_model, save_model
from ldm.files import sha256_file
from ldm.image_io import save_png

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
CASES = {"checkpoint_bytes": 120, "yaml": 40, "recipe": 40, "cli": 40}


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_fuzz_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools():
    return {name: _script(name) for name in ("ckpt_tool", "txt2img")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("fuzz-model")
    save_model(build_model(TINY), base / "tiny.safetensors")
    return base / "tiny.safetensors"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))


def _call(fn, *args) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code = fn(*args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def _assert_clean(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"{what}: exit {code}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{what}: traceback\n{err[-2000:]}"
    if code == 2:
        assert err.startswith("error: "), f"{what}: {err[:500]}"


def _mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "truncate", "insert", "zero", "header"])
        if op == "flip" and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            data = data[: rng.randrange(len(data) + 1)]
        elif op == "insert":
            i = rng.randrange(len(data) + 1)
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == "zero" and data:
            i = rng.randrange(len(data))
            data[i : i + rng.randint(1, 64)] = bytes(min(64, len(data) - i))
        elif op == "header" and len(data) > 16:
            i = rng.randrange(min(len(data), 200))
            data[i] = rng.randrange(256)
    return bytes(data)


def test_fuzz_checkpoint_bytes(tools, tmp_path):
    marker = tmp_path / "marker"
    small = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "n": torch.tensor([1.5, -2.0])}
    sources = {}
    for suffix in (".safetensors", ".ckpt"):
        path = tmp_path / f"src{suffix}"
        if suffix == ".ckpt":
            torch.save({"state_dict": small, "global_step": 3}, path)
        else:
            save_file(small, str(path))
        sources[suffix] = path.read_bytes()
    rng = random.Random(1234)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES["checkpoint_bytes"]):
        suffix = rng.choice(list(sources))
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(_mutate(sources[suffix], rng))
        for argv in (["inspect", str(path)], ["convert", str(path), str(tmp_path / f"out{case}.safetensors")]):
            code, err = _call(tools["ckpt_tool"].main, argv)
            _assert_clean(code, err, f"case {case} {argv[0]}")
            outcomes[code] += 1
            if argv[0] == "convert" and code == 2:
                assert not (tmp_path / f"out{case}.safetensors").exists()
    assert not marker.exists() and not list(tmp_path.glob(".*tmp*"))
    print(f"checkpoint bytes: {CASES['checkpoint_bytes']} files, {sum(outcomes.values())} tool runs, {outcomes}")
    assert outcomes[2] > 0  # the mutations do break files


def _random_value(rng: random.Random):
    return rng.choice([
        None, -1, 0, 3, 10**9, 2.5, float("nan"), float("inf"), -0.0, True, "", "32", "abc", "${oc.env:HOME}",
        [], [1, 2], [0, "x"], {"target": "os.system", "params": {"command": "touch MARKER"}}, {"a": 1},
        {"target": "torch.nn.Identity"}, "&anchor", "*alias", "\x00",
    ])


def _all_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _all_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _all_paths(value, prefix + (i,))


@pytest.mark.slow
def test_fuzz_model_yaml(tools, tiny, tmp_path):
    marker = tmp_path / "marker"
    base = OmegaConf.to_container(OmegaConf.load(TINY))
    paths = list(_all_paths(base))
    rng = random.Random(99)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES["yaml"]):
        cfg = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            node = cfg
            try:
                for key in path[:-1]:
                    node = node[key]
                value = _random_value(rng)
                if isinstance(value, dict) and value.get("target") == "os.system":
                    value = {"target": "torch.utils.collect_env.run", "params": {"command": f"touch {marker}"}}
                if rng.random() < 0.2 and isinstance(node, dict):
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue
        text = OmegaConf.to_yaml(OmegaConf.create(cfg)) if rng.random() < 0.8 else json.dumps(cfg)[: rng.randrange(400)]
        config = tmp_path / f"case{case}.yaml"
        config.write_text(text)
        code, err = _call(tools["ckpt_tool"].main, ["check", str(tiny), "--config", str(config)])
        _assert_clean(code, err, f"yaml case {case}")
        outcomes[code] += 1
    assert not marker.exists()
    print(f"model YAML: {CASES['yaml']} configs, {outcomes}")


RECIPE = {"prompt": "x", "seed": 3, "steps": 2, "height": 32, "width": 32, "sampler": "ddim", "guidance_scale": 3.0,
          "eta": None, "negative_prompt": "", "precision": "fp32", "compile": False, "use_ema": False,
          "discretization": None, "guidance_rescale": 0.0, "script": "txt2img"}


@pytest.mark.slow
def test_fuzz_recipe_fields(tools, tiny, tmp_path):
    rng = random.Random(7)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES["recipe"]):
        meta = {**RECIPE, "config": str(TINY), "ckpt": str(tiny), "model_sha256": sha256_file(tiny)}
        for _ in range(rng.randint(1, 2)):
            key = rng.choice(list(meta))
            meta[key] = _random_value(rng) if rng.random() < 0.8 else rng.choice([1, 2, 8, 16, 64, "euler", "plms"])
        png = tmp_path / f"case{case}.png"
        save_png(torch.zeros(3, 8, 8), png, meta)
        out = tmp_path / f"out{case}"
        code, err = _call(tools["txt2img"].run, ["--regenerate", str(png), "--outdir", str(out)])
        _assert_clean(code, err, f"recipe case {case}: {meta}")
        outcomes[code] += 1
        if code == 2:
            assert not out.exists(), f"recipe case {case} left {out}"
    print(f"recipe fields: {CASES['recipe']} PNGs, {outcomes}")


FLAGS = ["--scale", "--ddim_steps", "--H", "--W", "--seed", "--ddim_eta", "--n_samples", "--n_iter", "--precision",
         "--sampler", "--neg", "--device", "--n_rows", "guidance_rescale", "discretization", "--strength", "--bogus"]


@pytest.mark.slow
def test_fuzz_cli_values(tools, tiny, tmp_path):
    rng = random.Random(5)
    outcomes = {0: 0, 2: 0}
    for case in range(CASES["cli"]):
        argv = ["--prompt", "x", "--H", "32", "--W", "32", "--ddim_steps", "2", "--n_iter", "1", "--n_samples", "1",
                "--config", str(TINY), "--ckpt", str(tiny)]
        for _ in range(rng.randint(1, 2)):
            flag = rng.choice(FLAGS)
            value = rng.choice(["0", "-1", "1", "2", "7.5", "nan", "inf", "-inf", "1e400", "abc", "", "null", "16",
                                str(2**40), "euler", "plms", "fp16", "cpu", "cuda", "${oc.env:HOME}", "[1,2]"])
            argv += [f"{flag}={value}"] if not flag.startswith("-") else [flag, value]
        out = tmp_path / f"out{case}"
        code, err = _call(tools["txt2img"].run, [*argv, "--outdir", str(out)])
        _assert_clean(code, err, f"cli case {case}: {argv}")
        outcomes[code] += 1
        if code == 2:
            assert not out.exists(), f"cli case {case} left {out}"
    print(f"CLI values: {CASES['cli']} runs, {outcomes}")
