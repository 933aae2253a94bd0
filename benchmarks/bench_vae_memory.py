"""Peak memory and time of one VAE decode (the SD / SDXL autoencoder architecture, random weights): ours vs
diffusers' ``AutoencoderKL`` with the same weights, untiled and tiled, fp32 and bf16.

    python benchmarks/bench_vae_memory.py --size 1024 [--tile 64] [--skip ROW ...]

Rows (each in its own fresh process, so its peak RSS is its own):

  ours fp32                  AutoencoderKL.decode (NCHW, as prepare_for_inference(model, "fp32") leaves it)
  ours fp32 tiled            ldm.models.vae_tiling.tiled_decode, --tile latents per tile, overlap a quarter
  ours bf16                  bf16 weights, channels-last (what prepare_for_inference(model, "bf16") does)
  diffusers fp32             diffusers.AutoencoderKL.decode, converted from ours by diffusers' single-file utilities
  diffusers fp32 tiled       the same with enable_tiling() (its default: 64-latent tiles, a quarter overlap)
  diffusers bf16             bf16 weights (diffusers' pipelines leave the VAE NCHW)

Columns: decode seconds (one call, after a warm-up decode of a latent of 1/16 the area); peak GiB: the
process's peak RSS over the warm-up and the decode (VmHWM, reset after the weights are built where Linux
allows, so building / converting them does not count; weights included); "decode adds": that peak minus the
RSS before the warm-up; max |difference| from ours fp32 in [0, 1] pixels (same latent).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
ROWS = {  # key: (impl, precision, tiled)
    "ours-fp32": ("ours", "fp32", False),
    "ours-fp32-tiled": ("ours", "fp32", True),
    "ours-bf16": ("ours", "bf16", False),
    "diffusers-fp32": ("diffusers", "fp32", False),
    "diffusers-fp32-tiled": ("diffusers", "fp32", True),
    "diffusers-bf16": ("diffusers", "bf16", False),
}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build(impl: str, precision: str, tiled: bool, tile: int):
    """(decode function, weights module) for one row; ours and diffusers' hold the same random weights."""
    import torch

    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.vae_tiling import tiled_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(ddconfig=DDCONFIG, lossconfig=None, embed_dim=4).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if impl == "ours":
        if precision == "bf16":
            vae.to(memory_format=torch.channels_last)
        vae.to(dtype)
        if tiled:
            return (lambda z: tiled_decode(vae.decode, z, 8, tile, tile // 4)), vae
        return vae.decode, vae
    import diffusers
    from diffusers.loaders import single_file_utils as sf

    ckpt = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": DDCONFIG, "embed_dim": 4}}}}}
    cfg = sf.create_vae_diffusers_config_from_ldm(original, ckpt, scaling_factor=0.18215)
    cfg["sample_size"] = tile * 8  # the tile size of enable_tiling(), in pixels
    ref = diffusers.AutoencoderKL(**cfg).eval()
    ref.load_state_dict(sf.convert_ldm_vae_checkpoint(ckpt, cfg), strict=True)
    ref.to(dtype)
    if tiled:
        ref.enable_tiling()
    return (lambda z: ref.decode(z).sample), ref


def child(key: str, size: int, tile: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.bench_txt2img import reset_peak_rss

    torch.set_grad_enabled(False)
    impl, precision, tiled = ROWS[key]
    decode, _ = build(impl, precision, tiled, tile)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    before = rss_kib("VmRSS")  # the weights; building / converting them is not counted (VmHWM reset)
    can_reset = reset_peak_rss()
    decode(z[:, :, : size // 32, : size // 32].to(dtype))  # warm-up (1/16 of the area): kernels chosen
    start = time.perf_counter()
    image = decode(z.to(dtype))
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    torch.save(((image.float() + 1) / 2).clamp(0, 1), out)
    print(json.dumps({"key": key, "seconds": seconds, "before_kib": before, "peak_kib": peak,
                      "decode_kib": peak - before if can_reset else None, "shape": list(image.shape)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels")
    parser.add_argument("--tile", type=int, default=64, help="latents per tile side of the tiled rows (64 = 512 px)")
    parser.add_argument("--skip", nargs="+", default=[], choices=list(ROWS), metavar="ROW")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size % 32:
        parser.error("--size must be a multiple of 32")
    if args.child is not None:
        child(args.child, args.size, args.tile, args.out)
        return
    import tempfile

    import torch

    rows = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-vae-") as work:
        for key in [k for k in ROWS if k not in args.skip]:
            out = Path(work) / f"{key}.pt"
            proc = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--tile", str(args.tile),
                                   "--child", key, "--out", str(out)], capture_output=True, text=True)
            if proc.returncode:
                print(f"{key}: FAILED\n{proc.stderr[-2000:]}")
                continue
            rows[key] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[key]["image"] = torch.load(out)
            print(f"  {key} done in {rows[key]['seconds']:.1f} s", flush=True)
    ref = rows.get("ours-fp32", {}).get("image")
    print(f"\nVAE decode {args.size}x{args.size}, one latent (SD/SDXL autoencoder architecture, same random weights), "
          f"{torch.get_num_threads()} CPU threads; tiles of {args.tile} latents, overlap {args.tile // 4}")
    print(f"{'row':22s} {'decode s':>8s} {'peak GiB':>8s} {'decode adds GiB':>15s} {'max |diff|':>10s}")
    for key, r in rows.items():
        adds = f"{r['decode_kib'] / 2**20:15.2f}" if r["decode_kib"] is not None else f"{'n/a':>15s}"
        diff = f"{(r['image'] - ref).abs().max().item():10.4f}" if ref is not None else f"{'n/a':>10s}"
        print(f"{key:22s} {r['seconds']:8.1f} {r['peak_kib'] / 2**20:8.2f} {adds} {diff}")
    for ours, theirs in [("ours-fp32", "diffusers-fp32"), ("ours-fp32-tiled", "diffusers-fp32-tiled"),
                         ("ours-bf16", "diffusers-bf16")]:
        if ours in rows and theirs in rows:
            o, d = rows[ours], rows[theirs]
            mem = (f", decode memory {o['decode_kib'] / d['decode_kib']:.2f}x"
                   if o["decode_kib"] and d["decode_kib"] else "")
            print(f"{ours} / {theirs}: time {o['seconds'] / d['seconds']:.2f}x, "
                  f"peak RSS {o['peak_kib'] / d['peak_kib']:.2f}x{mem}")


if __name__ == "__main__":
    main()
