#!/usr/bin/env python
"""Train the bundled digits demo from scratch and install it as the scripts' default model.

  python scripts/build_demo.py [--work logs/demo] [--vae-steps 600] [--steps 2000] [--no-install]

Stage 1 trains the autoencoder (experiment digits_autoencoder), stage 2 the text-conditional
latent diffusion model on its latents (experiment digits). The EMA export (fp16) is copied to
ldm/assets/digits_demo/ with a grid of generated digits and the measured accuracy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "ldm" / "assets" / "digits_demo"


def run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="logs/demo")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--reuse-vae", action="store_true", help="keep an existing stage-1 export in --work")
    parser.add_argument("--no-install", action="store_true")
    args = parser.parse_args()
    work = (ROOT / args.work).resolve()
    t0 = time.time()
    reuse = args.reuse_vae and (work / "vae" / "export" / "model.safetensors").is_file()
    if not reuse:
        run(["main.py", "experiment=digits_autoencoder", f"trainer.max_steps={args.vae_steps}", f"hydra.run.dir={work / 'vae'}"])
    t1 = time.time()
    run(["main.py", "experiment=digits", f"trainer.max_steps={args.steps}", f"hydra.run.dir={work / 'ldm'}",
         f"model.params.first_stage_config.params.ckpt_path={work / 'vae' / 'export' / 'model.safetensors'}"])
    t2 = time.time()
    metrics = json.loads((work / "ldm" / "metrics.json").read_text())
    summary = {"autoencoder_minutes": "reused" if reuse else round((t1 - t0) / 60, 1), "diffusion_minutes": round((t2 - t1) / 60, 1),
               "digit_accuracy": metrics.get("digit_accuracy"), "val_loss": metrics.get("val/loss"),
               "per_digit": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("digit_accuracy/")}}
    print(json.dumps(summary, indent=2))
    if args.no_install:
        return
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copy2(work / "ldm" / "export" / name, ASSETS / name)
    (ASSETS / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    grid = sorted((work / "ldm" / "images").glob("step-*.png"))
    if grid:
        shutil.copy2(grid[-1], ASSETS / "grid.png")
    size = (ASSETS / "model.safetensors").stat().st_size / 2**20
    print(f"installed the demo model in {ASSETS} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
