"""Opt-in approximate accelerations: DeepCache-style feature reuse and ToMe token merging (off by default)."""
from pathlib import Path

import pytest
import torch

from ldm import settings
from ldm.api import build_model
from ldm.generation import generate
from ldm.image_io import read_metadata
from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.sampling.approx import Approximations, approximations
from ldm.modules.attention import CrossAttention, attention
from ldm.modules.diffusionmodules.feature_reuse import FeatureReuse
from ldm.modules.tome import TokenMerging, bipartite_matching, destination_mask
from tests.helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
TINY_XL = ROOT / "configs/tiny/tiny-sdxl.yaml"
TINY_INPAINT = ROOT / "configs/tiny/tiny-sd1-inpainting.yaml"
OPTS = dict(steps=5, height=32, width=32, guidance_scale=3.0, progress=False)


def random_model(config: Path, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose UNet has no zero-initialised layers (so every block changes the output)."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    randomize_(model.model.diffusion_model, seed=seed + 1)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


def context_dim(unet: torch.nn.Module) -> int:
    """The text embedding width the UNet's cross-attentions take."""
    return next(m for m in unet.modules() if isinstance(m, CrossAttention) and m.to_k.in_features != m.to_q.in_features
                ).to_k.in_features


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY)


def assert_unpatched(unet: torch.nn.Module) -> None:
    """No instance-level forward and no hook left anywhere in the UNet."""
    for name, module in unet.named_modules():
        assert "forward" not in vars(module), name
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def test_interval_one_and_ratio_zero_are_bit_identical_and_leave_no_patch(tiny):
    ref = generate(tiny, ["a red cube", "a blue ball"], seeds=[1, 2], **OPTS)
    for extra in ({"deepcache_interval": 1}, {"tome_ratio": 0.0}, {"deepcache_interval": 1, "tome_ratio": 0.0}):
        assert torch.equal(generate(tiny, ["a red cube", "a blue ball"], seeds=[1, 2], **OPTS, **extra), ref), extra
    assert_unpatched(tiny.model.diffusion_model)


def count_calls(module: torch.nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_full_unet_runs_exactly_every_nth_call_under_cfg():
    model = random_model(TINY)
    unet = model.model.diffusion_model
    middle, first = count_calls(unet.middle_block), count_calls(unet.input_blocks[0])
    ctx = model.get_learned_conditioning(["a red cube", ""])
    with approximations(model, Approximations(deepcache_interval=3)) as reuse:
        out = sample(model, ctx[:1], uncond=ctx[1:], guidance_scale=3.0, sampler="ddim", steps=7,
                     shape=(4, 16, 16), seeds=[3], progress=False)
        assert reuse.calls == 7 and reuse.full_calls == 3
    assert len(middle) == 3 and len(first) == 7  # calls 0, 3, 6 full; every call runs the shallow blocks
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    exact = sample(model, ctx[:1], uncond=ctx[1:], guidance_scale=3.0, sampler="ddim", steps=7,
                   shape=(4, 16, 16), seeds=[3], progress=False)
    assert not torch.equal(out, exact) and (out - exact).abs().mean() < 0.5 * exact.abs().mean()


@pytest.mark.parametrize("config", [TINY, TINY_XL, TINY_INPAINT], ids=["sd1", "sdxl", "inpainting"])
def test_a_reuse_call_on_the_same_input_reproduces_the_full_call(config):
    # The shallow path with the deep features of the same input must give the full result: checks the wiring
    # (which blocks run, which skips they take) for every depth, with vector conditioning y and 9-channel inputs.
    model = random_model(config)
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 64 if config == TINY_XL else 32, generator=g)
    y = torch.randn(2, 80, generator=g) if config == TINY_XL else None
    t = torch.tensor([500, 500])
    with torch.no_grad():
        ref = unet(x, t, context=ctx, y=y)
        for depth in range(len(unet.input_blocks)):
            with FeatureReuse(unet, interval=2, depth=depth) as reuse:
                full, again = unet(x, t, context=ctx, y=y), unet(x, t, context=ctx, y=y)
                assert reuse.full_calls == 1 and reuse.calls == 2
            assert torch.equal(full, ref) and torch.allclose(again, ref, atol=1e-6), depth
    assert_unpatched(unet)


def test_each_generation_starts_with_a_fresh_cache(tiny):
    # Two batches of one image: the second must not reuse the first one's features.
    both = generate(tiny, ["a red cube", "a blue ball"], seeds=[1, 2], batch_size=1, deepcache_interval=3, **OPTS)
    second = generate(tiny, ["a blue ball"], seeds=[2], deepcache_interval=3, **OPTS)
    assert torch.equal(both[1], second[0])


def test_sdxl_and_inpainting_models_run_with_both_approximations():
    xl = random_model(TINY_XL)
    out = generate(xl, ["a red cube"], seeds=[1], deepcache_interval=2, tome_ratio=0.5, **OPTS)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert_unpatched(xl.model.diffusion_model)
    inpaint = random_model(TINY_INPAINT)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    init = torch.rand(1, 3, 32, 32)
    out = generate(inpaint, ["a vase"], seeds=[1], init_image=init, mask=mask, deepcache_interval=2, tome_ratio=0.5,
                   **OPTS)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_tome_changes_the_result_reproducibly_and_only_at_the_top_resolution(tiny):
    unet = tiny.model.diffusion_model
    tome = TokenMerging(unet, 0.5)
    # tiny-sd1 has transformers at downsampling 1 and 2: only the first level's self-attentions are patched.
    assert len(tome.attentions) == 3 and all(a.to_q.in_features == 32 for a in tome.attentions)
    a = generate(tiny, ["a red cube"], seeds=[1], tome_ratio=0.5, **OPTS)
    b = generate(tiny, ["a red cube"], seeds=[1], tome_ratio=0.5, **OPTS)
    exact = generate(tiny, ["a red cube"], seeds=[1], **OPTS)
    assert torch.equal(a, b) and not torch.equal(a, exact)
    assert (a - exact).abs().mean() < 0.1


def test_tome_layers_and_depth_choose_what_is_patched(tiny):
    unet = tiny.model.diffusion_model
    top = TokenMerging(unet, 0.5, "all")
    two_levels = TokenMerging(unet, 0.5, "attention", max_downsample=2)
    assert len(top.blocks) == 3 and len(two_levels.blocks) > 3
    assert {b.attn1.to_q.in_features for b in two_levels.blocks} == {32, 64}  # tiny-sd1's first two levels
    with top:
        patched = {name for name, m in unet.named_modules() if "forward" in vars(m)}
    assert {n.rsplit(".", 1)[1] for n in patched} == {"attn1", "attn2", "ff"} and len(patched) == 9
    assert_unpatched(unet)
    for bad in ({"layers": "mlp"}, {"max_downsample": 3}):
        with pytest.raises(ValueError, match="must be one of"):
            TokenMerging(unet, 0.5, **bad)


def test_each_wider_scope_computes_less_and_moves_further_from_exact(tiny):
    """Counted FLOPs of one UNet call fall as merging reaches more sub-layers and levels, each a real change."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = tiny.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, context_dim(unet), generator=g)
    t = torch.tensor([300, 300])

    def run(**kw: object) -> tuple[int, torch.Tensor]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if kw:
                with TokenMerging(unet, 0.5, **kw):
                    out = unet(x, t, context=ctx)
            else:
                out = unet(x, t, context=ctx)
        return counter.get_total_flops(), out

    scopes = [{}, {"layers": "self_attention"}, {"layers": "attention"}, {"layers": "all"},
              {"layers": "all", "max_downsample": 2}]
    results = [run(**kw) for kw in scopes]
    flops = [f for f, _ in results]
    assert all(a > b for a, b in zip(flops, flops[1:])), flops
    outs = [o for _, o in results]
    assert all(not torch.equal(a, b) for a, b in zip(outs, outs[1:]))


def windowed_duplicates(b: int, h: int, w: int, c: int) -> torch.Tensor:
    """[b, h*w, c] tokens where every 2x2 window holds four copies of one random token."""
    small = torch.randn(b, c, h // 2, w // 2, generator=torch.Generator().manual_seed(4))
    return torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)


def test_merging_duplicates_reproduces_full_attention():
    x = windowed_duplicates(2, 6, 8, 16)
    plan = bipartite_matching(x, 6, 8, 0.75, torch.Generator().manual_seed(1))
    merged = plan.merge(x)
    assert merged.shape == (2, 12, 16)  # one token per window is left
    torch.testing.assert_close(plan.unmerge(merged), x)
    # Every key appears four times in the full set, so softmax attention over the merged set is the same.
    q, k, v = (torch.randn(16, 16, generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7))
    full = attention(x @ q, x @ k, x @ v, heads=2)
    torch.testing.assert_close(plan.unmerge(attention(merged @ q, merged @ k, merged @ v, heads=2)), full)
    # Destinations: exactly one per 2x2 window; odd sizes leave the extra row / column to the sources.
    mask = destination_mask(5, 7, torch.Generator().manual_seed(0)).reshape(5, 7)
    assert mask[:4, :6].reshape(2, 2, 3, 2).sum(dim=(1, 3)).eq(1).all() and not mask[4].any() and not mask[:, 6].any()


def test_merged_attention_layer_matches_on_duplicates():
    attn = randomize_(CrossAttention(16, heads=2, dim_head=8), seed=3).eval()
    x = windowed_duplicates(1, 4, 4, 16)
    plan = bipartite_matching(x, 4, 4, 0.75)
    with torch.no_grad():
        torch.testing.assert_close(plan.unmerge(attn(plan.merge(x))), attn(x))
    assert bipartite_matching(x, 4, 4, 0.0) is None  # nothing to merge: the layer runs unchanged


def test_merging_a_whole_block_is_exact_on_duplicated_windows(tiny):
    """Where each 2x2 window holds one token four times, merging three of them for self-attention, cross-attention
    and feed-forward alike must give exactly the full transformer's output (the per-token layers see the same
    token, and attention over four copies of each key equals attention over one)."""
    unet = tiny.model.diffusion_model
    tome = TokenMerging(unet, 0.75, "all")
    transformer = tome.transformers[0]
    c = transformer.in_channels
    small = torch.randn(2, c, 4, 4, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest")
    ctx = torch.randn(2, 77, context_dim(unet), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact = transformer(x, context=ctx)
        with tome:
            merged = transformer(x, context=ctx)
        noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        with tome:
            approx = transformer(noisy, context=ctx)
    torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(approx, transformer(noisy, context=ctx), atol=1e-3)  # not a no-op elsewhere


def test_patches_are_removed_after_an_error(tiny):
    def fail(_info: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(tiny, ["a red cube"], seeds=[1], deepcache_interval=2, tome_ratio=0.5, callback=fail, **OPTS)
    assert_unpatched(tiny.model.diffusion_model)


def test_user_errors_are_one_line():
    model = random_model(TINY)
    for bad, message in (({"deepcache_interval": 0}, "deepcache_interval must be at least 1, got 0"),
                         ({"tome_ratio": 0.9}, "tome_ratio must be in [0, 0.75], got 0.9"),
                         ({"tome_ratio": 0.5, "tome_max_downsample": 3},
                          "tome_max_downsample must be one of 1, 2, 4, 8, got 3"),
                         ({"deepcache_interval": 2, "deepcache_depth": 9},
                          "deepcache_depth must be in [0, 3] for this UNet (4 input blocks), got 9")):
        with pytest.raises(ValueError) as err:
            generate(model, ["x"], seeds=[1], **OPTS, **bad)
        assert str(err.value) == message and "\n" not in str(err.value)


def test_settings_are_recorded_and_regenerated(txt2img, model_args, tmp_path):
    fields = settings.recipe_fields("txt2img")
    assert {"deepcache_interval", "deepcache_depth", "tome_ratio", "tome_layers", "tome_max_downsample"} <= set(fields)
    assert "tome_ratio" not in settings.names("upscale")
    assert settings.defaults("txt2img")["deepcache_interval"] is None and settings.defaults("txt2img")["tome_ratio"] is None
    out = tmp_path / "out"
    argv = ["--prompt", "a cube", "--H", "32", "--W", "32", "--ddim_steps", "3", "--n_iter", "1", "--n_samples", "1",
            *model_args, "--outdir", str(out), "deepcache_interval=2", "tome_ratio=0.5", "tome_layers=all"]
    assert txt2img.run(argv) == 0
    meta = read_metadata(out / "samples" / "00000.png")
    assert meta["deepcache_interval"] == 2 and meta["tome_ratio"] == 0.5 and meta["deepcache_depth"] == 1
    assert meta["tome_layers"] == "all" and meta["tome_max_downsample"] == 1
    again = tmp_path / "again"
    assert txt2img.run(["--regenerate", str(out / "samples" / "00000.png"), "--outdir", str(again)]) == 0
    assert read_metadata(again / "samples" / "00000.png") == meta
