#!/usr/bin/env python
"""Collect a sweep (``python main.py -m ...``) into ``sweep.csv`` and ``sweep.png`` in its folder.

  python scripts/gather_sweep.py logs/tiny/sweep-2026-11-23_12-00-00 [--metric digit_accuracy]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli_errors import guarded  # noqa: E402
from ldm.sweeps import collect, plot, write_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default=None, help="metric to plot (default: val/loss)")
    args = parser.parse_args()
    rows = guarded(collect, args.sweep_dir)
    table = write_table(rows, Path(args.sweep_dir) / "sweep.csv")
    figure = guarded(plot, rows, Path(args.sweep_dir) / "sweep.png", args.metric)
    print(f"{len(rows)} runs -> {table}, {figure}")


if __name__ == "__main__":
    main()
