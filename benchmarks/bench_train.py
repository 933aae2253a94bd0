#!/usr/bin/env python
"""Training speed: our LatentDiffusion training step vs a plain diffusers-style loop, same UNet weights.

Ours: ``LatentDiffusion.p_losses`` (noising from the shared schedule, eps target, loss) + AdamW.
Peer: diffusers ``UNet2DConditionModel`` (converted from ours) + ``DDPMScheduler.add_noise`` + MSE + AdamW.
Both train on the same random latents and text contexts (first and cond stages are frozen in both,
so they are left out). Reports steps/s and the ratio, also for our step under bf16 autocast
(Lightning's bf16-mixed) against the peer's fp32.

A second table measures the data path of a whole training step (encode images and captions,
loss, backward, AdamW) against the same step fed from the latent cache (``data.cache``).

  python benchmarks/bench_train.py [--sd-steps 3] [--sd-latent 32]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def diffusers_unet(model, config_path: Path):
    import diffusers
    from diffusers.loaders import single_file_utils as sf

    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params, resolve=True)
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.diffusion_model.")}
    ucfg = sf.create_unet_diffusers_config_from_ldm({"model": {"params": params}}, sd)
    unet = diffusers.UNet2DConditionModel(**ucfg)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    return unet.train()


def time_steps(step, n: int) -> float:
    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t0)


def bench(name: str, config: Path, batch: int, latent: int, n: int) -> None:
    import diffusers

    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model(config).train()
    ctx_dim = OmegaConf.load(config).model.params.unet_config.params.context_dim
    z = torch.randn(batch, 4, latent, latent)
    c = torch.randn(batch, 77, ctx_dim)
    unet = diffusers_unet(model, config)
    ours_opt = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=1e-5)
    peer_opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def ours():
        t = torch.randint(0, 1000, (batch,))
        loss, _ = model.p_losses(z, c, t)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def peer():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(z)
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred, noise)
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()

    def ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t = torch.randint(0, 1000, (batch,))
            loss, _ = model.p_losses(z, c, t)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    a, b, a16 = time_steps(ours, n), time_steps(peer, n), time_steps(ours_bf16, n)
    print(f"{name:34s} ours {a:7.3f} steps/s   diffusers-style {b:7.3f} steps/s   ratio {a / b:.2f}x   "
          f"ours bf16-mixed {a16:7.3f} steps/s ({a16 / b:.2f}x)", flush=True)


def bench_cache(config: Path, batch: int, n: int) -> None:
    """Whole step from images + captions vs from cached latents and contexts."""
    import tempfile

    from torch.utils.data import Subset

    from ldm.api import build_model
    from ldm.data.datamodule import collate
    from ldm.data.digits import DigitsDataset
    from ldm.data.latent_cache import CachedLatentDataset, build_cache

    torch.manual_seed(0)
    model = build_model(config).train()
    data = Subset(DigitsDataset(split="train", size=16), range(batch))
    images = collate([data[i] for i in range(batch)])
    cache = CachedLatentDataset(build_cache(model, data, Path(tempfile.mkdtemp()) / "cache"))
    cached = collate([cache[i] for i in range(batch)])
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

    def step(b):
        def run():
            loss, _ = model.shared_step(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    a, b = time_steps(step(cached), n), time_steps(step(images), n)
    print(f"{'digits LDM step, batch ' + str(batch):34s} from cache {a:7.3f} steps/s   from images {b:7.3f} steps/s   "
          f"ratio {a / b:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--sd-steps", type=int, default=3)
    parser.add_argument("--sd-latent", type=int, default=32)
    parser.add_argument("--skip-sd", action="store_true")
    args = parser.parse_args()
    print(f"CPU threads {torch.get_num_threads()}, fp32")
    bench("tiny UNet (configs/tiny), batch 8, 8x8", ROOT / "configs/tiny/tiny-sd1.yaml", 8, 8, args.tiny_steps)
    bench_cache(ROOT / "configs/experiment/digits.yaml", 64, args.tiny_steps)
    if not args.skip_sd:
        bench(f"SD 1.x UNet, batch 1, {args.sd_latent}x{args.sd_latent}", ROOT / "configs/stable-diffusion/v1-inference.yaml",
              1, args.sd_latent, args.sd_steps)


if __name__ == "__main__":
    main()
