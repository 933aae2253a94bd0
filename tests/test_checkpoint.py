"""Tests for ldm.checkpoint: formats, EMA, strict checks, damaged files, atomic saves, memory."""
from __future__ import annotations

import builtins
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

import ldm.checkpoint as ckpt
from ldm.checkpoint import (CheckpointError, checkpoint_metadata, empty_init, load_into_model, read_state_dict,
                            save_state_dict, split_ema)

REPO = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """Conv/GroupNorm/Linear with a float and an int buffer, and a CompVis-like ``model`` submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 1))
        self.head = nn.Linear(4, 2)
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("steps", torch.tensor([7, 9], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.model(x) * self.scale).mean((2, 3)))


def make_source(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # non-default values so a skipped load cannot pass by accident
        for p in m.parameters():
            p.normal_()
    return m


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt"])
def test_round_trip_bit_identical(tmp_path: Path, name: str) -> None:
    sd = make_source().state_dict()
    save_state_dict(sd, tmp_path / name, metadata={"global_step": "3"})
    assert_same(read_state_dict(tmp_path / name), sd)
    assert checkpoint_metadata(tmp_path / name)["global_step"] == "3"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_lightning_ckpt_unwrapped_with_metadata(tmp_path: Path) -> None:
    sd = make_source().state_dict()
    torch.save({"state_dict": {**sd, "note": "not a tensor"}, "global_step": 3, "epoch": 1}, tmp_path / "l.ckpt")
    assert_same(read_state_dict(tmp_path / "l.ckpt"), sd)
    meta = checkpoint_metadata(tmp_path / "l.ckpt")
    assert meta["global_step"] == 3 and meta["epoch"] == 1


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_model_module_wrappers(tmp_path: Path, wrapper: str) -> None:
    sd = make_source().state_dict()
    torch.save({wrapper: sd, "optimizer": {"lr": 0.1}}, tmp_path / "w.pth")
    assert_same(read_state_dict(tmp_path / "w.pth"), sd)


def test_legacy_format_and_unknown_suffix_sniffed(tmp_path: Path) -> None:
    sd = make_source().state_dict()
    torch.save({"state_dict": sd}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    assert_same(read_state_dict(tmp_path / "old.ckpt"), sd)
    save_state_dict(sd, tmp_path / "a.safetensors")
    save_state_dict(sd, tmp_path / "b.ckpt")
    os.rename(tmp_path / "a.safetensors", tmp_path / "a.weights")
    os.rename(tmp_path / "b.ckpt", tmp_path / "b.data")
    assert_same(read_state_dict(tmp_path / "a.weights"), sd)
    assert_same(read_state_dict(tmp_path / "b.data"), sd)


def test_save_shared_tensors_and_dtype(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    save_state_dict({"a": w, "b": w, "n": torch.arange(3)}, tmp_path / "s.safetensors", dtype=torch.float16)
    out = read_state_dict(tmp_path / "s.safetensors")
    assert out["a"].dtype == out["b"].dtype == torch.float16 and out["n"].dtype == torch.int64
    assert torch.equal(out["a"], w.half()) and torch.equal(out["b"], w.half())


# --- loading into models -----------------------------------------------------------------------

@pytest.mark.parametrize("build", ["empty_init", "meta_device"])
@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt"])
def test_meta_model_fully_materialised(tmp_path: Path, build: str, name: str) -> None:
    src = make_source()
    save_state_dict(src.state_dict(), tmp_path / name)
    ctx = empty_init() if build == "empty_init" else torch.device("meta")
    with ctx:
        model = Tiny()
    assert all(p.is_meta for p in model.parameters())
    model.head.bias.requires_grad_(False)  # trainability must survive assign=True
    load_into_model(model, read_state_dict(tmp_path / name))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert not model.head.bias.requires_grad and model.head.weight.requires_grad
    assert_same(model.state_dict(), src.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), src(x))


def test_empty_init_skips_transformers_random_init_but_ties_weights(tmp_path: Path) -> None:
    """A transformers model built under empty_init draws no random weights (its init would run on meta
    tensors for nothing) yet still ties its weights, and loads to exactly the source model; outside
    empty_init the random init still runs."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

    cfg = GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0)
    drawn = []
    original = PreTrainedModel._init_weights

    def counting(self, module):  # type: ignore[no-untyped-def]
        drawn.append(type(module).__name__)
        return original(self, module)

    PreTrainedModel._init_weights = counting
    try:
        torch.manual_seed(0)
        src = GPT2LMHeadModel(cfg).eval()
        assert drawn, "the random init did not run outside empty_init"
        drawn.clear()
        with empty_init():
            model = GPT2LMHeadModel(cfg).eval()
        assert drawn == []
    finally:
        PreTrainedModel._init_weights = original
    assert PreTrainedModel.init_weights.__qualname__ == "PreTrainedModel.init_weights"  # restored
    assert model.lm_head.weight is model.transformer.wte.weight
    save_state_dict(src.state_dict(), tmp_path / "g.safetensors")
    load_into_model(model, read_state_dict(tmp_path / "g.safetensors"), optional_keys=["lm_head.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight or torch.equal(model.lm_head.weight,
                                                                                model.transformer.wte.weight)
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids).logits, src(ids).logits)


def test_fp16_file_into_fp32_model(tmp_path: Path) -> None:
    src = make_source()
    save_state_dict(src.state_dict(), tmp_path / "h.safetensors", dtype=torch.float16)
    with empty_init():
        model = Tiny()
    load_into_model(model, read_state_dict(tmp_path / "h.safetensors"))
    for k, v in model.state_dict().items():
        ref = src.state_dict()[k]
        expect = ref.half().float() if ref.is_floating_point() else ref
        assert v.dtype == ref.dtype and torch.equal(v, expect), k


def test_fp32_file_into_bf16_model_and_explicit_dtype(tmp_path: Path) -> None:
    src = make_source()
    save_state_dict(src.state_dict(), tmp_path / "f.ckpt")
    with empty_init():
        model = Tiny().to(torch.bfloat16)
    load_into_model(model, read_state_dict(tmp_path / "f.ckpt"))
    assert model.head.weight.dtype == torch.bfloat16 and model.steps.dtype == torch.int64
    assert torch.equal(model.head.weight, src.head.weight.bfloat16())
    with empty_init():
        model = Tiny()
    load_into_model(model, read_state_dict(tmp_path / "f.ckpt"), dtype=torch.float16)
    assert model.model[0].weight.dtype == torch.float16 and model.steps.dtype == torch.int64


def test_non_persistent_meta_buffer_is_named(tmp_path: Path) -> None:
    class WithIds(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("position_ids", torch.arange(4), persistent=False)

    save_state_dict(make_source().state_dict(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = WithIds()
    with pytest.raises(CheckpointError, match=r"position_ids.*empty_init"):
        load_into_model(model, read_state_dict(tmp_path / "w.safetensors"))
    with empty_init():
        model = WithIds()
    load_into_model(model, read_state_dict(tmp_path / "w.safetensors"))
    assert torch.equal(model.position_ids, torch.arange(4))


@pytest.mark.parametrize("in_model", [True, False])
@pytest.mark.parametrize("in_file", [True, False])
def test_optional_position_ids(in_model: bool, in_file: bool) -> None:
    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.register_buffer("position_ids", torch.arange(5).expand(1, -1), persistent=in_model)

    sd = {"proj.weight": torch.ones(2, 2), "proj.bias": torch.zeros(2)}
    if in_file:
        sd["position_ids"] = torch.arange(5).expand(1, -1)
    with empty_init():
        model = Text()
    load_into_model(model, sd, optional_keys=["*position_ids"])
    assert torch.equal(model.proj.weight, torch.ones(2, 2)) and torch.equal(model.position_ids[0], torch.arange(5))
    with empty_init():
        model = Text()
    if in_file and not in_model:
        with pytest.raises(CheckpointError, match="unexpected"):
            load_into_model(model, sd)


def test_strict_mismatch_message_is_grouped() -> None:
    model = nn.Module()
    model.model = nn.Module()
    model.model.diffusion_model = nn.Module()
    model.model.diffusion_model.input_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(200))
    model.model.diffusion_model.out = nn.Linear(2, 3)
    sd = {k: torch.zeros(v.shape) for k, v in model.state_dict().items() if "input_blocks" not in k}
    sd["model.diffusion_model.out.weight"] = torch.zeros(5, 2)
    for i in range(12):  # 12 prefixes -> only the biggest 8 are listed
        for j in range(i + 1):
            sd[f"cond_stage_model.part{i}.layer.{j}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, sd)
    msg = str(err.value)
    lines = msg.splitlines()
    assert len(lines) <= 25 and len(msg) < 3000, msg
    assert "400 missing" in lines[0] and "78 unexpected" in lines[0] and "strict=False" in lines[0]
    assert "model.diffusion_model.input_blocks.* (400 keys, e.g. model.diffusion_model.input_blocks.0.bias)" in msg
    assert "cond_stage_model.part11.layer.* (12 keys" in msg and "... and 4 more groups (10 keys)" in msg
    assert "cond_stage_model.part0.layer.0.weight" not in msg  # small groups are summarised, not dumped
    assert "model.diffusion_model.out.weight: file (5, 2) vs model (3, 2)" in msg
    with pytest.raises(CheckpointError, match="shape mismatches"):  # shapes are checked even when not strict
        load_into_model(model, sd, strict=False)


def test_ignore_keys_and_unloaded_tensors_reported() -> None:
    src = make_source()
    sd = {**src.state_dict(), "loss.logvar": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="loss.logvar"):
        load_into_model(Tiny(), sd)
    model = Tiny()
    load_into_model(model, sd, ignore_keys=["loss."])
    assert_same(model.state_dict(), src.state_dict())
    with empty_init():
        model = Tiny()
    del sd["head.bias"]
    with pytest.raises(CheckpointError, match=r"meta tensors.*head\.bias"):
        load_into_model(model, sd, strict=False, ignore_keys=["loss."])


# --- EMA ---------------------------------------------------------------------------------------

def ema_state(src: Tiny) -> dict[str, torch.Tensor]:
    sd = dict(src.state_dict())
    for name, p in src.model.named_parameters():
        sd["model_ema." + name.replace(".", "")] = p.detach() + 100
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(5, dtype=torch.int32)
    return sd


def test_split_ema() -> None:
    src = make_source()
    sd = ema_state(src)
    names = [n for n, _ in src.named_parameters()]
    ema = split_ema(sd, names, use_ema=True)
    raw = split_ema(sd, names, use_ema=False)
    for out in (ema, raw):
        assert not any(k.startswith("model_ema") for k in out) and out.keys() == src.state_dict().keys()
    assert torch.equal(ema["model.0.weight"], src.model[0].weight + 100)
    assert torch.equal(ema["model.1.bias"], src.model[1].bias + 100)
    assert torch.equal(raw["model.0.weight"], src.model[0].weight)
    assert torch.equal(ema["head.weight"], src.head.weight)  # outside `model`: never EMA'd
    model = Tiny()
    load_into_model(model, ema)
    assert torch.equal(model.model[3].weight, src.model[3].weight + 100)


def test_split_ema_without_ema_weights() -> None:
    src = make_source()
    with pytest.raises(CheckpointError) as err:
        split_ema(src.state_dict(), [n for n, _ in src.named_parameters()], use_ema=True)
    assert "no model_ema.* keys" in one_line(err) and "use_ema=False" in str(err.value)


# --- damaged and hostile files -----------------------------------------------------------------

def _damaged(tmp_path: Path, case: str) -> Path:
    sd = make_source().state_dict()
    if case == "missing":
        return tmp_path / "nope.safetensors"
    if case == "directory":
        (tmp_path / "dir.ckpt").mkdir()
        return tmp_path / "dir.ckpt"
    if case.startswith("random"):
        p = tmp_path / f"r{case[len('random'):]}"
        p.write_bytes(random.Random(0).randbytes(4096))  # seeded: no lucky magic bytes
        return p
    if case == "empty":
        (tmp_path / "e.ckpt").touch()
        return tmp_path / "e.ckpt"
    if case == "no_tensors":
        torch.save({"global_step": 3, "config": {"lr": 1.0}}, tmp_path / "n.ckpt")
        return tmp_path / "n.ckpt"
    p = tmp_path / ("t.safetensors" if case == "truncated_safetensors" else "t.ckpt")
    if case == "truncated_legacy":
        torch.save(sd, p, _use_new_zipfile_serialization=False)
    else:
        save_state_dict(sd, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


@pytest.mark.parametrize("case", ["missing", "directory", "random.ckpt", "random.safetensors", "random.bin",
                                  "random.xyz", "empty", "no_tensors", "truncated_safetensors", "truncated_ckpt",
                                  "truncated_legacy"])
def test_damaged_files_give_one_line_errors(tmp_path: Path, case: str) -> None:
    path = _damaged(tmp_path, case)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = one_line(err)
    assert str(path) in msg and len(msg) < 400, msg
    # No chained library traceback.
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
    assert "unsafe" not in msg  # damage must not be mistaken for a hostile pickle


class Hostile:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_code_carrying_pickle_needs_opt_in(tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    torch.save({"state_dict": make_source().state_dict(), "payload": Hostile(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    msg = one_line(err)
    assert "arbitrary code" in msg and "allow_unsafe_pickle=True" in msg and str(path) in msg
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        checkpoint_metadata(path)
    assert not marker.exists()
    assert_same(read_state_dict(path, allow_unsafe_pickle=True), make_source().state_dict())
    assert marker.read_text() == "pwned"


def test_unsafe_pickle_of_uninstalled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = types.ModuleType("gone_pkg")
    gone.Config = type("Config", (), {"__module__": "gone_pkg"})
    monkeypatch.setitem(sys.modules, "gone_pkg", gone)
    torch.save({"state_dict": make_source().state_dict(), "hparams": gone.Config()}, tmp_path / "h.ckpt")
    monkeypatch.delitem(sys.modules, "gone_pkg")
    with pytest.raises(CheckpointError, match=r"references gone_pkg\.Config"):
        read_state_dict(tmp_path / "h.ckpt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "h.ckpt", allow_unsafe_pickle=True)
    assert "not installed" in one_line(err) and "gone_pkg" in str(err.value)


# --- atomic save -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w.safetensors", "w.ckpt"])
def test_failed_save_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    target = tmp_path / name
    save_state_dict(make_source(0).state_dict(), target)
    before = target.read_bytes()

    def half_written(*args, **kwargs):
        dest = args[1]
        if isinstance(dest, (str, Path)):
            Path(dest).write_bytes(b"partial")
        else:
            dest.write(b"partial")
        raise OSError(28, "No space left on device")

    if name.endswith(".safetensors"):
        monkeypatch.setattr(ckpt, "save_file", half_written)
    else:
        monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(CheckpointError) as err:
        save_state_dict(make_source(1).state_dict(), target)
    assert "No space left" in one_line(err) and "unchanged" in str(err.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]


# --- memory and init cost ----------------------------------------------------------------------

def test_empty_init_is_free_and_keeps_buffers() -> None:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(4096, 4096) for _ in range(13)), nn.GroupNorm(32, 4096))
            self.register_buffer("position_ids", torch.arange(77).expand(1, -1), persistent=False)

    original = nn.Module.register_parameter
    proc = psutil.Process()
    rss0, t0 = proc.memory_info().rss, time.perf_counter()
    with empty_init():
        model = Big()  # ~218M parameters = 870 MB if they were real
    elapsed, grown = time.perf_counter() - t0, proc.memory_info().rss - rss0
    assert all(p.is_meta and type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    assert not model.position_ids.is_meta and int(model.position_ids[0, -1]) == 76
    assert elapsed < 2.0 and grown < 100 * 2**20, (elapsed, grown)
    assert nn.Module.register_parameter is original
    assert not nn.Linear(2, 2).weight.is_meta  # patch undone on exit


_CHILD = textwrap.dedent("""
    import json, resource, sys, psutil, torch
    from torch import nn
    from ldm.checkpoint import empty_init, load_into_model, read_state_dict
    path, n, copy = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "copy"
    proc = psutil.Process()
    with empty_init():
        model = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(n)))
    rss0, peak0 = proc.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    samples = []
    sd = read_state_dict(path)
    samples.append(proc.memory_info().rss)
    if copy:  # control: a loader that copies the (touched) mapped weights
        kept, sd = sd, {k: v.clone() for k, v in sd.items()}
    load_into_model(model, sd)
    samples.append(proc.memory_info().rss)
    total = sum(float(p.detach().sum()) for p in model.parameters())  # touch every weight page
    samples.append(proc.memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if peak > peak0:  # a new high-water mark was reached while loading
        samples.append(peak)
    print(json.dumps({"growth": max(samples) - rss0, "total": total}))
""")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    n = 50  # 50 x 4 MiB = 200 MiB
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_state_dict({f"{i}.weight": torch.rand(1024, 1024, generator=gen) for i in range(n)}, path)
    return path, n


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["load", "copy"])
def test_peak_rss_is_one_copy(big_file: tuple[Path, int], mode: str) -> None:
    path, n = big_file
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(n), mode], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = json.loads(out.stdout.strip().splitlines()[-1])["growth"] / path.stat().st_size
    if mode == "load":
        assert ratio < 1.5, f"peak RSS grew {ratio:.2f}x the file size: weights were copied"
    else:  # proves the measurement can see a second copy
        assert ratio > 1.5, ratio


_CHILD_CONVERT = textwrap.dedent("""
    import gc, json, sys, psutil, torch
    from torch import nn
    from ldm.checkpoint import empty_init, load_into_model, read_state_dict
    path, n = sys.argv[1], int(sys.argv[2])
    with empty_init():
        model = nn.Module()
        model.net = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(n)))
        model.register_buffer("schedule", torch.zeros(1000))  # like LatentDiffusion's betas / alphas_cumprod
    rss0 = psutil.Process().memory_info().rss
    load_into_model(model, read_state_dict(path))
    sum(float(p.detach().sum()) for p in model.parameters())  # touch every weight page
    model.net.to(torch.bfloat16)  # what prepare_for_inference does to the networks (not to the schedule)
    gc.collect()
    print(json.dumps({"growth": psutil.Process().memory_info().rss - rss0}))
""")


@pytest.mark.slow
def test_converted_weights_release_the_file_mapping(tmp_path: Path) -> None:
    """After the networks are converted to bf16, nothing loaded (a float buffer left in fp32 either) may keep the
    file's memory map, and with it every fp32 page read, resident: the process holds the bf16 copy only."""
    n = 50  # 200 MiB of fp32 weights
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "weights.safetensors"
    state = {f"net.{i}.weight": torch.rand(1024, 1024, generator=gen) for i in range(n)}
    save_state_dict({**state, "schedule": torch.linspace(0, 1, 1000)}, path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD_CONVERT, str(path), str(n)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = json.loads(out.stdout.strip().splitlines()[-1])["growth"] / path.stat().st_size
    assert ratio < 0.75, f"RSS is {ratio:.2f}x the fp32 file after converting to bf16 (0.5x expected): the mapping is kept"
