"""kill -9 at random moments (and halfway through checkpoint writes), resume, repeat: the run ends bit-exact.

Training checkpoints every step. One kill tears a checkpoint file mid-write, one lands right after a
checkpoint is in place but before Lightning logs that batch's metrics row, and the others at seeded
random delays after the run has written a checkpoint. Afterwards the weights, EMA and optimizer
moments equal an uninterrupted run's, ``metrics.csv`` holds every step's row exactly once with the
same values, and no temporary file is left.
"""
import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
STEPS = 6
COMMON = ["experiment=tiny", "loggers=[csv]", "progress_refresh=0", f"trainer.max_steps={STEPS}",
          "trainer.log_every_n_steps=1", "checkpoint.every_n_train_steps=1", "export.enabled=false",
          "data.validation=null"]

pytestmark = pytest.mark.slow


def _args(run: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "run_main.py"), *COMMON, f"hydra.run.dir={run}", *extra]


def _rows(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    steps = [int(float(r["step"])) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated metric rows: {sorted(steps)}"
    return {s: float(r["train/loss_step"]) for s, r in zip(steps, rows)}


def _leftovers(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp-" in p.name]


def test_random_kills_and_a_torn_write_resume_bit_exactly(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_args(straight), env=ENV, cwd=tmp_path, check=True, capture_output=True, timeout=600)

    run, rng, kills = tmp_path / "killed", random.Random(2026), 0
    # First attempt: die halfway through writing the 3rd checkpoint file.
    first = subprocess.run(_args(run), env={**ENV, "LDM_TEST_KILL_DURING_SAVE": "3"}, cwd=tmp_path,
                           capture_output=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert _leftovers(run), "the torn write left no temporary file (the kill came too late)"
    # Second attempt: die right after a checkpoint is in place, before Lightning logs that batch's row.
    second = subprocess.run(_args(run, f"resume={run}"), env={**ENV, "LDM_TEST_KILL_AFTER_SAVE": "2"}, cwd=tmp_path,
                            capture_output=True, timeout=600)
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    kills += 2
    for attempt in range(8):
        proc = subprocess.Popen(_args(run, f"resume={run}"), env=ENV, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        last = run / "checkpoints" / "last.ckpt"
        start_mtime = last.stat().st_mtime_ns if last.exists() else 0
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # wait for this attempt's first checkpoint
            if last.exists() and last.stat().st_mtime_ns != start_mtime:
                break
            time.sleep(0.05)
        if proc.poll() is None and attempt < 2:
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert proc.returncode == 0, "the run did not finish after its resumes"

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
               for i in sa)
    assert _rows(run) == _rows(straight) and sorted(_rows(run)) == list(range(STEPS))
    assert not _leftovers(run)
    print(f"kills: {kills}")
