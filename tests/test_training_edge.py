"""The edges of a training run: atomic writes (mode, failure, leftovers), non-mutating export, test hooks."""
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import pytest
import torch

from ldm.checkpoint import CheckpointError, save_state_dict
from ldm.files import atomic_output, atomic_write, remove_stale_temporaries
from ldm.training_state import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2 ** 30  # above any pid_max: never a live process


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name]


def test_every_writer_honours_the_umask(tmp_path, umask_022):
    state = {"w": torch.ones(2, 3)}
    save_state_dict(state, tmp_path / "a.safetensors")  # safetensors alone makes 0600 files
    save_state_dict(state, tmp_path / "a.ckpt")
    atomic_write(tmp_path / "a.txt", "hello")
    AtomicCheckpointIO().save_checkpoint({"state_dict": state}, tmp_path / "last.ckpt")
    for name in ("a.safetensors", "a.ckpt", "a.txt", "last.ckpt"):
        assert mode(tmp_path / name) == 0o644, name
    assert no_temporaries(tmp_path)
    os.umask(0o077)
    atomic_write(tmp_path / "private.txt", "x")
    assert mode(tmp_path / "private.txt") == 0o600


def test_a_failing_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    save_state_dict({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def torn_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("ldm.checkpoint.save_file", torn_write)
    with pytest.raises(CheckpointError, match="previous file, if any, is unchanged"):
        save_state_dict({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before and no_temporaries(tmp_path)
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "x.txt") as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert not (tmp_path / "x.txt").exists() and no_temporaries(tmp_path)


def test_temporaries_are_recognisable_and_stale_ones_removed(tmp_path):
    with atomic_output(tmp_path / "last.ckpt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".last.ckpt.tmp-{os.getpid()}-")
        tmp.write_bytes(b"x")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".last.ckpt.tmp-{DEAD_PID}-0a1b2c3d"
        legacy = tmp_path / f".step-000004.ckpt.tmp-{DEAD_PID}"  # the name checkpoint writes used before
        live = tmp_path / f".last.ckpt.tmp-{sleeper.pid}-deadbeef"
        unrelated = tmp_path / ".hidden.tmp-notapid"
        for p in (dead, legacy, live, unrelated):
            p.write_bytes(b"junk")
        assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead, legacy])
        assert live.exists() and unrelated.exists() and (tmp_path / "last.ckpt").exists()
        assert remove_stale_temporaries(tmp_path, keep_live=False) == [live]
        assert unrelated.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_package_has_no_test_hooks_cuda_literals_or_import_time_warning_filters():
    import ldm.trainer

    assert not hasattr(ldm.trainer, "DebugHooks")
    assert "debug:" not in (ROOT / "configs/train.yaml").read_text()
    offenders = [str(p) for p in (ROOT / "ldm").rglob("*.py") if '"cuda:' in p.read_text() or "'cuda:" in p.read_text()]
    assert not offenders
    code = ("import warnings; import ldm.trainer; "
            "assert not [f for f in warnings.filters if f[1] is not None and 'eval mode' in f[1].pattern]")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]


def tiny_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    common = ["experiment=tiny", "name=tiny", "loggers=[csv]", "progress_refresh=0", "data.validation=null"]
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=[*common, *overrides])


class Probe(pl.Callback):
    """Records the weights when training ends (before the export) and after the export (on_fit_end)."""

    def on_train_end(self, trainer, pl_module):
        self.trained = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer, pl_module):  # runs after EMAExport's on_fit_end
        from ldm.lora import has_lora

        self.after_export = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.has_lora = has_lora(pl_module)
        self.model = pl_module


@pytest.mark.slow
def test_lora_run_exports_without_merging_the_live_model_and_cleans_its_checkpoints(tmp_path):
    pytest.importorskip("peft")
    from ldm.trainer import train

    run = tmp_path / "run"
    stale = run / "checkpoints" / f".last.ckpt.tmp-{os.getpid()}"  # what a kill -9 mid-write used to leave
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"torn")
    probe = Probe()
    train(tiny_config("trainer.max_steps=2", "lora={rank: 4}"), run, extra_callbacks=[probe])
    assert not stale.exists() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "lora.safetensors").is_file()
    assert probe.has_lora and any(".lora_A." in k for k in probe.after_export)
    assert probe.trained.keys() == probe.after_export.keys()
    assert all(torch.equal(v, probe.after_export[k]) for k, v in probe.trained.items())
    assert any("base_layer" in n for n, _ in probe.model.named_parameters())  # peft layers still in place


def test_latent_cache_encodes_on_the_trainers_device(tmp_path):
    from ldm.trainer import _root_device

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    assert _root_device(trainer) == torch.device("cpu")
