"""Tiled VAE decoding: exact where the decoder is local, seamless and close to the untiled image otherwise."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.api import build_model
from ldm.generation import latent_factor
from ldm.models.vae_tiling import tiled_decode

ROOT = Path(__file__).resolve().parents[1]


def local_decode(z: torch.Tensor) -> torch.Tensor:
    """A decoder with no spatial context: each latent pixel becomes an 8x8 block."""
    return F.interpolate(torch.tanh(z[:, :3]), scale_factor=8, mode="nearest")


@pytest.mark.parametrize("h,w,tile,overlap", [(40, 40, 16, 4), (37, 21, 16, 8), (64, 32, 32, 0), (10, 12, 16, 4)])
def test_blending_is_exact_for_a_local_decoder(h, w, tile, overlap):
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
    sizes = []

    def decode(x):
        sizes.append(tuple(x.shape[-2:]))
        return local_decode(x)

    out = tiled_decode(decode, z, 8, tile, overlap)
    assert torch.allclose(out, local_decode(z), atol=1e-6)
    assert max(max(s) for s in sizes) <= tile  # memory follows the tile: no call saw more than one tile


def test_real_decoder_is_seamless_and_close_to_untiled():
    torch.manual_seed(0)
    model = build_model(ROOT / "configs/tiny/tiny-sd1.yaml").eval()
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    f = latent_factor(model)
    with torch.no_grad():
        plain = model.decode_first_stage(z)
        tiled = tiled_decode(model.decode_first_stage, z, f, 16, 4)
    assert tiled.shape == plain.shape
    assert (tiled - plain).abs().mean() < 0.25 * plain.abs().mean()  # per-tile norm statistics, small tiles
    # No seams: the horizontal gradient across tile borders is like the gradient elsewhere.
    grad = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    borders = [f * x - 1 for x in (12, 16, 24, 28, 36, 40)]  # where tiles start/end (stride 12)
    assert grad[borders].max() < 3 * grad.median()


@pytest.mark.slow
def test_generate_with_tiling_runs_and_stays_close(tmp_path):
    from ldm.generation import generate

    torch.manual_seed(0)
    model = build_model(ROOT / "configs/tiny/tiny-sd1.yaml").eval()
    opts = dict(seeds=[3], steps=2, height=96, width=96, progress=False)
    plain = generate(model, ["x"], **opts)
    tiled = generate(model, ["x"], vae_tiling=True, vae_tile_size=16, **opts)
    assert tiled.shape == plain.shape and (tiled - plain).abs().mean() < 0.05
