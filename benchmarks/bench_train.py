#!/usr/bin/env python
"""Training speed: our LatentDiffusion training step vs a plain diffusers-style loop, same UNet weights.

Ours: ``LatentDiffusion.p_losses`` (noising from the shared schedule, eps target, loss) + AdamW.
Peer: diffusers ``UNet2DConditionModel`` (converted from ours) + ``DDPMScheduler.add_noise`` + MSE + AdamW.
Both train on the same random latents and text contexts (first and cond stages are frozen in both,
so they are left out). Reports steps/s and the ratio, also for our step under bf16 autocast
(Lightning's bf16-mixed) against the peer's fp32.

Steps alternate between the two (median per step), so machine drift hits both alike. The
SD-size row uses SGD: two SD UNets with AdamW states do not fit in 24 GB.

A second table measures the data path of a whole training step (encode images and captions,
loss, backward, AdamW) against the same step fed from the latent cache (``data.cache``).

  python benchmarks/bench_train.py [--sd-steps 3] [--sd-latent 32]
"""
from __future__ import annotations

import argparse
import statistics
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


def interleaved(steps: dict, n: int) -> dict:
    """Steps/s of each step function, alternating them step by step (machine drift hits all alike); median."""
    for step in steps.values():
        step()  # warm-up
    times: dict = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: 1.0 / statistics.median(ts) for name, ts in times.items()}


def bench(name: str, config: Path, batch: int, latent: int, n: int, optimizer: str = "adamw") -> None:
    """One training step of ours and of the peer, same initial weights, alternated.

    ``optimizer="sgd"`` for the SD-size row: two SD UNets with AdamW states do not fit in 24 GB
    (the optimizer is torch's in both, so it adds the same time to both sides anyway).
    """
    import diffusers

    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model(config).train()
    for module in model.model.diffusion_model.modules():  # the peer's UNet does not recompute activations
        for flag in ("checkpoint", "use_checkpoint"):
            if isinstance(getattr(module, flag, None), bool):
                setattr(module, flag, False)
    ctx_dim = OmegaConf.load(config).model.params.unet_config.params.context_dim
    z = torch.randn(batch, 4, latent, latent)
    c = torch.randn(batch, 77, ctx_dim)
    unet = diffusers_unet(model, config)
    make_opt = (lambda ps: torch.optim.SGD(ps, lr=1e-5)) if optimizer == "sgd" else (lambda ps: torch.optim.AdamW(ps, lr=1e-5))
    ours_opt = make_opt([p for p in model.model.parameters() if p.requires_grad])
    peer_opt = make_opt(list(unet.parameters()))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def ours(autocast: bool = False):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                t = torch.randint(0, 1000, (batch,))
                loss, _ = model.p_losses(z, c, t)
            ours_opt.zero_grad(set_to_none=True)
            loss.backward()
            ours_opt.step()
        return run

    def peer():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(z)
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=c).sample
        loss = F.mse_loss(pred, noise)
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()

    r = interleaved({"ours": ours(), "peer": peer, "ours_bf16": ours(autocast=True)}, n)
    a, b, a16 = r["ours"], r["peer"], r["ours_bf16"]
    print(f"{name:34s} ours {a:7.3f} steps/s   diffusers-style {b:7.3f} steps/s   ratio {a / b:.2f}x   "
          f"ours bf16-mixed {a16:7.3f} steps/s ({a16 / b:.2f}x)   [{optimizer}]", flush=True)


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

    r = interleaved({"cached": step(cached), "images": step(images)}, n)
    a, b = r["cached"], r["images"]
    print(f"{'digits LDM step, batch ' + str(batch):34s} from cache {a:7.3f} steps/s   from images {b:7.3f} steps/s   "
          f"ratio {a / b:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--sd-steps", type=int, default=3)
    parser.add_argument("--sd-latent", type=int, default=32)
    parser.add_argument("--skip-sd", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    print(f"CPU threads {torch.get_num_threads()}, fp32")
    if not args.skip_tiny:
        bench("tiny UNet (configs/tiny), batch 8, 8x8", ROOT / "configs/tiny/tiny-sd1.yaml", 8, 8, args.tiny_steps)
        bench_cache(ROOT / "configs/experiment/digits.yaml", 64, args.tiny_steps)
    if not args.skip_sd:
        bench(f"SD 1.x UNet, batch 1, {args.sd_latent}x{args.sd_latent}", ROOT / "configs/stable-diffusion/v1-inference.yaml",
              1, args.sd_latent, args.sd_steps, optimizer="sgd")


if __name__ == "__main__":
    main()
