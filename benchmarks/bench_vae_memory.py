"""Peak memory and time of one VAE decode (the SD / SDXL autoencoder architecture, random weights), untiled vs tiled.

    python benchmarks/bench_vae_memory.py --size 1024 [--tile 64]

Each variant runs in its own process, so its peak RSS (ru_maxrss) is its own; the ratio against the
untiled decode is printed next to it. The process baseline (torch + the model) is measured too.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(size: int, tile: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.vae_tiling import tiled_decode

    torch.manual_seed(0)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(ddconfig=ddconfig, lossconfig=None, embed_dim=4).eval()
    z = torch.randn(1, 4, size // 8, size // 8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        out = vae.decode(z) if tile == 0 else tiled_decode(vae.decode, z, 8, tile, tile // 4)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tile": tile, "seconds": seconds, "baseline_kib": base, "peak_kib": peak,
                      "shape": list(out.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=64, help="latent pixels per tile (64 = 512 image pixels)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.size, args.child)
        return
    rows = []
    for tile in (0, args.tile):
        out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", str(tile)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = rows[0]
    print(f"VAE decode {args.size}x{args.size} (SD/SDXL autoencoder architecture, fp32, CPU)")
    for r in rows:
        name = "untiled" if r["tile"] == 0 else f"tiled ({r['tile']} latents, overlap {r['tile'] // 4})"
        extra = (r["peak_kib"] - r["baseline_kib"]) / 2**20
        print(f"  {name:32s} {r['seconds']:7.1f} s   peak RSS {r['peak_kib'] / 2**20:5.2f} GiB "
              f"(decode adds {extra:5.2f} GiB)   peak vs untiled {r['peak_kib'] / plain['peak_kib']:.2f}x")


if __name__ == "__main__":
    main()
