#!/usr/bin/env python
"""Checkpoint loading: time and peak RSS of ``ldm.api.load_model`` against the CompVis way.

Builds the full SD 1.x architecture (v1-inference.yaml), saves random weights to a ~4 GB
safetensors file, then loads it in fresh processes:
  ours     build on meta (empty_init) + mmap'd safetensors assigned in place, strict check
  compvis  build on CPU (random init) + safetensors.load_file + load_state_dict(strict=False)
and prints peak RSS relative to the weight bytes (goal: <= 1.2x) and the time ratio.

  python benchmarks/bench_load.py [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/stable-diffusion/v1-inference.yaml"


def vm_hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM resets at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(mode: str, path: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch  # noqa: F401  (import cost is not part of the load)

    from ldm.api import build_model, load_model

    base = vm_hwm()
    t0 = time.perf_counter()
    if mode == "ours":
        model = load_model(CONFIG, path)
    else:
        from safetensors.torch import load_file

        model = build_model(CONFIG, use_ema=False)
        model.load_state_dict(load_file(path), strict=False)
        model.eval()
    # Touch every weight so lazily mapped pages count (a real first forward pass would).
    total = sum(float(p.detach().float().sum()) for p in model.parameters())
    elapsed = time.perf_counter() - t0
    peak = vm_hwm()
    print(json.dumps({"seconds": elapsed, "peak_rss": peak, "base_rss": base, "checksum": total}))


def make_file(path: Path) -> int:
    sys.path.insert(0, str(ROOT))
    import torch

    from ldm.api import build_model, save_model

    torch.manual_seed(0)
    model = build_model(CONFIG, use_ema=False)
    save_model(model, path)
    return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def run(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{mode} load failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ldm-bench-"))
    path = work / "sd-v1-random.safetensors"
    t0 = time.perf_counter()
    weight_bytes = make_file(path)
    print(f"wrote {path.stat().st_size / 2**30:.2f} GiB random SD 1.x weights in {time.perf_counter() - t0:.0f}s")
    try:
        res = {mode: run(mode, path) for mode in ("ours", "compvis")}
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    assert abs(res["ours"]["checksum"] - res["compvis"]["checksum"]) <= 1e-6 * abs(res["compvis"]["checksum"]) + 1e-3
    print(f"weights: {weight_bytes / 2**30:.2f} GiB")
    print(f"{'loader':8s} {'seconds':>8s} {'peak RSS GiB':>13s} {'peak/weights':>13s} {'(peak-imports)/weights':>23s}")
    for mode, r in res.items():
        growth = (r["peak_rss"] - r["base_rss"]) / weight_bytes
        print(f"{mode:8s} {r['seconds']:8.1f} {r['peak_rss'] / 2**30:13.2f} {r['peak_rss'] / weight_bytes:12.2f}x {growth:22.2f}x")
    o, c = res["ours"], res["compvis"]
    print(f"ratio ours/compvis: time {o['seconds'] / c['seconds']:.2f}x, peak RSS {o['peak_rss'] / c['peak_rss']:.2f}x")


if __name__ == "__main__":
    main()
