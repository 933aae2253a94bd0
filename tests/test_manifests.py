"""Full-size official architectures, built on the meta device, match the reference manifests."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"

# (config, overrides, manifest, expected parameter counts: unet, vae, text, total)
CASES = [
    ("v1-inference.yaml", {}, "sd-v1", (859_520_964, 83_653_863, 123_060_480, 1_066_235_307)),
    ("v1-inference.yaml", {"use_ema": True}, "sd-v1-with-ema", (859_520_964, 83_653_863, 123_060_480, 1_066_235_307)),
    ("v1-inpainting-inference.yaml", {}, "sd-v1-inpainting", (859_535_364, 83_653_863, 123_060_480, 1_066_249_707)),
    ("v2-inference.yaml", {}, "sd-v2", (865_910_724, 83_653_863, 354_032_641, 1_303_597_228)),
    ("v2-inference-v.yaml", {}, "sd-v2", (865_910_724, 83_653_863, 354_032_641, 1_303_597_228)),
    ("v2-inpainting-inference.yaml", {}, "sd-v2-inpainting", (865_925_124, 83_653_863, 354_032_641, 1_303_611_628)),
]


def read_manifest(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = path.read_text().splitlines()
    assert rows[0].split("\t") == ["key", "shape", "dtype"]
    out = {}
    for row in rows[1:]:
        key, shape, dtype = row.split("\t")
        out[key] = (tuple(int(s) for s in shape.split(",") if s), dtype)
    return out


def build_on_meta(config_name: str, overrides: dict):
    cfg = OmegaConf.load(CONFIGS / config_name).model
    for k, v in overrides.items():
        cfg.params[k] = v
    with torch.device("meta"):
        return instantiate_from_config(cfg)


@pytest.mark.parametrize("config_name,overrides,manifest,counts", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_meta_build_matches_manifest(reference_dir, config_name, overrides, manifest, counts):
    model = build_on_meta(config_name, overrides)
    expected = read_manifest(reference_dir / f"{manifest}.tsv")
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not wrong, f"shape/dtype mismatches: {list(wrong.items())[:5]}"

    unet, vae, text, total = counts
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert numel(model.model.diffusion_model) == unet
    assert numel(model.first_stage_model) == vae
    assert numel(model.cond_stage_model) == text
    assert numel(model) == total
    assert all(t.is_meta for t in model.state_dict().values()), "meta build materialised a tensor"


SDXL_UNETS = {
    "sdxl-base": dict(model_channels=320, channel_mult=[1, 2, 4], transformer_depth=[0, 2, 10], context_dim=2048, adm_in_channels=2816),
    "sdxl-refiner": dict(model_channels=384, channel_mult=[1, 2, 4, 4], transformer_depth=4, context_dim=[1280] * 4, adm_in_channels=2560),
}


@pytest.mark.parametrize("manifest", sorted(SDXL_UNETS))
def test_sdxl_unet_part_matches_manifest(reference_dir, manifest):
    """The same UNetModel covers SDXL's (vector conditioning through label_emb, per-level depth)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, num_res_blocks=2, attention_resolutions=[4, 2],
                         num_head_channels=64, use_linear_in_transformer=True, num_classes="sequential",
                         use_spatial_transformer=True, legacy=False, **SDXL_UNETS[manifest])
    prefix = "model.diffusion_model."
    expected = {k[len(prefix):]: v[0] for k, v in read_manifest(reference_dir / f"{manifest}.tsv").items() if k.startswith(prefix)}
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert got == expected
