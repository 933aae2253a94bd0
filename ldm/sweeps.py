"""Gather a Hydra multirun (sweep) into one table and one plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from ldm.files import atomic_write
from ldm.util import load_yaml


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per finished run: the overrides the sweep varied, plus that run's metrics.json."""
    rows = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        run = metrics_file.parent
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = load_yaml(overrides_file) if overrides_file.is_file() else []
        row = {"run": run.name}
        for item in overrides:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = value
        row.update(_flatten(json.loads(metrics_file.read_text())))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no */metrics.json under {sweep_dir}; is it a finished sweep directory (logs/<name>/sweep-...)?")
    return rows


def varied_keys(rows: list[dict]) -> list[str]:
    keys = [k for k in rows[0] if k != "run" and not isinstance(rows[0][k], (int, float))]
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def write_table(rows: list[dict], path: str | Path) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)

    def render() -> str:
        import io

        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    atomic_write(path, render())
    return path


def plot(rows: list[dict], path: str | Path, metric: Optional[str] = None) -> Path:
    """Bar chart of ``metric`` (default: val/loss, else the first numeric metric) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != "global_step"]
    metric = metric or ("val/loss" if "val/loss" in numeric else (numeric[0] if numeric else None))
    if metric is None:
        raise ValueError("the runs' metrics.json files hold no numeric metric to plot")
    keys = varied_keys(rows) or ["run"]
    labels = [", ".join(f"{k}={r.get(k)}" for k in keys) for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    ax.bar(range(len(rows)), [float(r.get(metric, float("nan"))) for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
