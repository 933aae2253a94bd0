"""The CompVis / SD 2 model API tools call: ancestral sampling (checked against closed forms), ``sample_log``,
``log_images``, the null conditioning, ``CrossAttention`` (masks, replaceable ``forward``) and ``ldm.util``.

Gaussian data x0 ~ N(MU, S^2) has an exact denoiser: with x_t = sqrt(a) x0 + sqrt(1 - a) eps,
E[x0 | x_t] = MU + sqrt(a) S^2 / (a S^2 + 1 - a) (x_t - sqrt(a) MU); a network returning the matching
eps / v makes the ancestral sampler an exact-model sampler whose output must have the data's distribution.
"""
import math
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
MU, S = 0.5, 1.0


@pytest.fixture(scope="module")
def tiny():
    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    # The UNet's output conv and the transformers' proj_out start at zero (every prediction would be 0 and
    # attention could not matter): give them small random weights.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def cond(tiny):
    return tiny.get_learned_conditioning(["a red square", "a blue circle"])


def gaussian_oracle(model, parameterization):
    """apply_model of a perfect network for Gaussian data, at the model's integer timesteps."""
    alpha_bar = model.alphas_cumprod.detach().double()

    def apply_model(x, t, cond=None, return_ids=False):
        a = alpha_bar[t].reshape(-1, *([1] * (x.dim() - 1)))
        x = x.double()
        x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()

    return apply_model


def use_oracle(monkeypatch, model, parameterization):
    monkeypatch.setattr(model, "apply_model", gaussian_oracle(model, parameterization))
    monkeypatch.setattr(model, "parameterization", parameterization)
    monkeypatch.setattr(model, "clip_denoised", False)


# ---- the posterior and the ancestral sampler --------------------------------------------------

def test_q_posterior_is_the_gaussian_posterior_of_the_forward_process(tiny):
    betas = tiny.betas.double()
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 1, 10, 500, 999])
    x0, xt = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    mean, var, log_var = tiny.q_posterior(x0, xt, t)
    assert mean.shape == x0.shape and torch.broadcast_shapes(var.shape, x0.shape) == x0.shape
    for i, ti in enumerate(t.tolist()):
        if ti == 0:  # x_0 given x_0: no uncertainty left
            torch.testing.assert_close(mean[i], x0[i])
            assert var[i].item() == 0 and log_var[i].item() < -40
            continue
        # x_{t-1} | x0 ~ N(sqrt(ab') x0, 1 - ab'), x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta): precisions add.
        ab_prev, beta = alpha_bar[ti - 1], betas[ti]
        v = 1 / (1 / (1 - ab_prev) + (1 - beta) / beta)
        m = v * (ab_prev.sqrt() * x0[i].double() / (1 - ab_prev) + (1 - beta).sqrt() * xt[i].double() / beta)
        torch.testing.assert_close(mean[i].double(), m, rtol=1e-5, atol=1e-6)
        assert var[i].item() == pytest.approx(v.item(), rel=1e-5)
        assert log_var[i].item() == pytest.approx(math.log(v.item()), abs=1e-5)


def test_p_mean_variance_recovers_the_exact_denoiser_for_eps_and_v(tiny, monkeypatch):
    x = torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 300, 900])
    a = tiny.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    exact_x0 = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x.double() - a.sqrt() * MU)
    results = {}
    for param in ("eps", "v"):
        use_oracle(monkeypatch, tiny, param)
        results[param] = tiny.p_mean_variance(x, None, t, clip_denoised=False, return_x0=True)
        torch.testing.assert_close(results[param][3].double(), exact_x0, rtol=1e-4, atol=1e-4)
    for a_, b_ in zip(results["eps"], results["v"]):
        torch.testing.assert_close(a_, b_, rtol=1e-4, atol=1e-4)
    clipped = tiny.p_mean_variance(3 * x, None, t, clip_denoised=True, return_x0=True)[3]
    assert clipped.abs().max() <= 1.0


@pytest.mark.parametrize("param", ["eps", "v"])
def test_ancestral_sampler_produces_the_data_distribution(tiny, monkeypatch, param):
    use_oracle(monkeypatch, tiny, param)
    torch.manual_seed(0)
    z = tiny.sample(None, batch_size=16, shape=(16, 1, 32, 32), verbose=False)
    assert z.shape == (16, 1, 32, 32)
    # 16384 samples: the standard error of the mean is 0.008 and of the std 0.6 %.
    assert z.mean().item() == pytest.approx(MU, abs=0.03)
    assert z.std().item() == pytest.approx(S, rel=0.03)


def test_p_sample_loop_shapes_intermediates_callbacks_and_determinism(tiny, cond):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seen, images = [], []
    torch.manual_seed(1)
    a, inter = tiny.p_sample_loop(cond, (2, 4, 8, 8), return_intermediates=True, x_T=x_T, timesteps=6, log_every_t=4,
                                  verbose=False, callback=seen.append, img_callback=lambda img, i: images.append(i))
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
    assert seen == list(range(5, -1, -1)) and images == seen
    assert len(inter) == 4 and torch.equal(inter[0], x_T)  # x_T, then after t = 5, 4, 0
    assert torch.equal(inter[-1], a)
    torch.manual_seed(1)
    b = tiny.p_sample_loop(cond, (2, 4, 8, 8), x_T=x_T, timesteps=6, verbose=False)
    assert torch.equal(a, b)
    torch.manual_seed(2)
    other = tiny.p_sample_loop(cond, (2, 4, 8, 8), x_T=x_T, timesteps=6, verbose=False)
    assert not torch.allclose(a, other)  # fresh step noise: the sampler is stochastic
    torch.manual_seed(1)
    via_sample = tiny.sample(torch.cat([cond, cond]), batch_size=2, x_T=x_T, timesteps=6, verbose=False)
    assert torch.equal(via_sample, a)  # the conditioning is cut to batch_size
    # clip_denoised (the CompVis default) bounds the final x0 estimate.
    assert tiny.clip_denoised
    assert tiny.p_sample_loop(cond, (2, 4, 8, 8), x_T=10 * x_T, timesteps=2, verbose=False).abs().max() <= 1.0 + 1e-5


def test_sample_rejects_keywords_it_would_ignore(tiny, cond):
    with pytest.raises(TypeError, match="ddim_steps"):
        tiny.sample(cond, batch_size=2, ddim_steps=10)
    with pytest.raises(ValueError, match="timesteps"):
        tiny.sample(cond, batch_size=2, timesteps=5000, verbose=False)


def test_mask_keeps_the_known_region_exactly(tiny, cond):
    x0 = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    torch.manual_seed(0)
    out = tiny.sample(cond, batch_size=2, timesteps=10, mask=mask, x0=x0, verbose=False)
    torch.testing.assert_close(out[..., :4], x0[..., :4])
    assert not torch.allclose(out[..., 4:], x0[..., 4:], atol=1e-2)


def test_guidance_in_the_ancestral_sampler_is_the_cfg_combination(tiny, cond):
    from ldm.models.diffusion.compvis_api import GuidedConditioning

    uc = tiny.get_unconditional_conditioning(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([400, 400])
    guided = tiny.p_mean_variance(x, GuidedConditioning(cond, uc, 4.0), t, clip_denoised=False, return_x0=True)[3]
    out_c, out_u = tiny.apply_model(x, t, cond), tiny.apply_model(x, t, uc)
    a = tiny.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps = out_u + 4.0 * (out_c - out_u)
    torch.testing.assert_close(guided, (x - (1 - a).sqrt() * eps) / a.sqrt(), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    s1 = tiny.sample(cond, batch_size=2, timesteps=3, verbose=False, unconditional_guidance_scale=4.0, unconditional_conditioning=uc)
    torch.manual_seed(0)
    s2 = tiny.sample(cond, batch_size=2, timesteps=3, verbose=False)
    assert not torch.allclose(s1, s2)


def test_progressive_denoising_logs_x0_estimates(tiny, cond, monkeypatch):
    use_oracle(monkeypatch, tiny, "eps")
    x_T = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    img, x0s = tiny.progressive_denoising(cond, shape=(4, 8, 8), batch_size=2, x_T=x_T, start_T=30, log_every_t=10, verbose=False)
    assert img.shape == (2, 4, 8, 8) and len(x0s) == 4  # t = 29, 20, 10, 0
    a = tiny.alphas_cumprod.double()[29]
    exact_first = MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x_T.double() - a.sqrt() * MU)
    torch.testing.assert_close(x0s[0].double(), exact_first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0s[-1], img)  # no noise at t = 0: the sample is the last estimate


def test_sample_log_with_ddim_is_the_ddim_sampler(tiny, cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    samples, intermediates = tiny.sample_log(cond, 2, ddim=True, ddim_steps=4, x_T=x_T, eta=0.0)
    expected, _ = DDIMSampler(tiny).sample(4, 2, (4, 8, 8), cond, verbose=False, x_T=x_T, eta=0.0)
    assert samples.shape == (2, 4, 8, 8)
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)
    torch.manual_seed(0)
    ancestral, steps = tiny.sample_log(cond, 2, ddim=False, ddim_steps=None, x_T=x_T, timesteps=4, eta=0.0)
    torch.manual_seed(0)
    assert torch.equal(ancestral, tiny.sample(cond, batch_size=2, x_T=x_T, timesteps=4, verbose=False))
    assert isinstance(steps, list) and torch.equal(steps[0], x_T)


def test_unconditional_conditioning_is_the_empty_caption(tiny):
    uc = tiny.get_unconditional_conditioning(3)
    empty = tiny.get_learned_conditioning([""])
    assert uc.shape == (3, *empty.shape[1:])
    for row in uc:
        torch.testing.assert_close(row, empty[0])
    torch.testing.assert_close(tiny.get_unconditional_conditioning(2, "a cat")[1], tiny.get_learned_conditioning(["a cat"])[0])
    assert not torch.allclose(tiny.get_unconditional_conditioning(1, "a cat"), uc[:1])


def test_log_images_returns_the_compvis_keys(tiny, monkeypatch):
    batch = {"image": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": ["a red square", "a blue circle"]}
    torch.manual_seed(0)
    log = tiny.log_images(batch, N=2, n_row=2, ddim_steps=3, unconditional_guidance_scale=3.0,
                          plot_progressive_rows=False, plot_denoise_rows=True, split="train")
    expected = {"inputs", "reconstruction", "conditioning", "diffusion_row", "samples", "samples_cfg_scale_3.00",
                "samples_inpainting", "mask", "samples_outpainting", "denoise_row"}
    assert set(log) == expected
    for key in ("inputs", "reconstruction", "conditioning", "samples", "samples_cfg_scale_3.00", "samples_inpainting",
                "samples_outpainting"):
        assert log[key].shape == (2, 3, 16, 16), key
        assert torch.isfinite(log[key]).all(), key
    torch.testing.assert_close(log["inputs"], batch["image"].permute(0, 3, 1, 2))
    cond_img = log["conditioning"]
    assert cond_img.min() >= -1 and cond_img.max() <= 1 and not torch.equal(cond_img[0], cond_img[1])
    assert log["mask"].shape == (2, 1, 8, 8) and log["mask"].sum() == 2 * (64 - 16)
    # 11 logged noise levels (t = 0, 100, ..., 900, 999) per row, 2 rows, 2-pixel padding.
    assert log["diffusion_row"].shape == (3, 2 * 18 + 2, 11 * 18 + 2)
    assert log["denoise_row"].dim() == 3 and log["denoise_row"].shape[1] == 2 * 18 + 2  # DDIM's logged steps
    only = tiny.log_images(batch, N=1, ddim_steps=2, inpaint=False, plot_progressive_rows=False,
                           plot_diffusion_rows=False, return_keys=["samples"])
    assert list(only) == ["samples"] and only["samples"].shape == (1, 3, 16, 16)
    # The progressive row runs all 1000 ancestral steps: with the closed-form network, to stay fast.
    use_oracle(monkeypatch, tiny, "eps")
    rows = tiny.log_images(batch, N=2, sample=False, inpaint=False, plot_diffusion_rows=False)
    assert set(rows) == {"inputs", "reconstruction", "conditioning", "progressive_row"}
    assert rows["progressive_row"].shape == (3, 2 * 18 + 2, 11 * 18 + 2)  # x0 estimates at t = 999, 900, ..., 0


def test_pixel_ddpm_sampling_and_log_images():
    from ldm.models.diffusion.ddpm import DDPM

    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {"image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [],
                       "num_res_blocks": 1, "channel_mult": [1], "num_heads": 2}}
    torch.manual_seed(0)
    model = DDPM(unet, timesteps=20, image_size=8, channels=3, use_ema=False, log_every_t=5).eval()
    torch.manual_seed(1)
    x, steps = model.sample(batch_size=2, return_intermediates=True)
    assert x.shape == (2, 3, 8, 8) and len(steps) == 1 + 5  # x_T, then after t = 19, 15, 10, 5, 0
    assert x.abs().max() <= 1.0 + 1e-5  # clip_denoised: the last step returns the clipped x0 estimate
    log = model.log_images({"image": torch.rand(3, 8, 8, 3) * 2 - 1}, N=3, n_row=2)
    assert set(log) == {"inputs", "diffusion_row", "samples", "denoise_row"}
    assert log["inputs"].shape == log["samples"].shape == (3, 3, 8, 8)
    assert log["diffusion_row"].shape == (3, 2 * 10 + 2, 5 * 10 + 2)  # t = 0, 5, 10, 15, 19
    assert log["denoise_row"].shape == (3, 3 * 10 + 2, 6 * 10 + 2)


# ---- attention -------------------------------------------------------------------------------

def explicit_attention(layer, x, context, keep=None):
    """softmax(q k^T * scale) v per head, with masked keys removed from the softmax."""
    b, n, _ = x.shape
    h = layer.heads
    q, k, v = layer.to_q(x), layer.to_k(context), layer.to_v(context)
    outs = []
    for i in range(b):
        ki, vi = (k[i], v[i]) if keep is None else (k[i][keep[i]], v[i][keep[i]])
        qh, kh, vh = (t.reshape(t.shape[0], h, -1).transpose(0, 1) for t in (q[i], ki, vi))
        w = torch.exp(qh @ kh.transpose(-1, -2) * layer.scale)
        outs.append(((w / w.sum(-1, keepdim=True)) @ vh).transpose(0, 1).reshape(n, -1))
    return layer.to_out(torch.stack(outs))


def test_cross_attention_attributes_and_key_mask():
    from ldm.modules.attention import CrossAttention, MemoryEfficientCrossAttention

    torch.manual_seed(0)
    layer = CrossAttention(16, context_dim=12, heads=2, dim_head=8).eval()
    assert layer.heads == 2 and layer.scale == 8 ** -0.5
    assert MemoryEfficientCrossAttention(16, heads=2, dim_head=8).__class__.__name__ == "CrossAttention"
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = layer(x, ctx, mask=keep)
        torch.testing.assert_close(out, explicit_attention(layer, x, ctx, keep), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x, ctx), explicit_attention(layer, x, ctx), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, layer(x, ctx), atol=1e-4)
        moved = ctx.clone()
        moved[~keep] = 100 * torch.randn(int((~keep).sum()), 12)  # masked keys cannot matter
        torch.testing.assert_close(layer(x, moved, mask=keep), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x, ctx, mask=torch.ones(2, 7, dtype=torch.bool)), layer(x, ctx))
        torch.testing.assert_close(layer(x, ctx, mask=keep[:, None, :]), out)  # [B, ...] flattens, as CompVis
        # every key masked: uniform attention (CompVis' masked_fill), not NaN
        none = layer(x, ctx, mask=torch.zeros(2, 7, dtype=torch.bool))
        uniform = layer.to_out(layer.to_v(ctx).mean(1, keepdim=True).expand(2, 5, -1))
        torch.testing.assert_close(none, uniform, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="boolean"):
        layer(x, ctx, mask=keep.float())
    with pytest.raises(ValueError, match="does not match"):
        layer(x, ctx, mask=keep[:, :5])


def test_attention_control_replacing_forward_runs_in_every_cross_attention_layer(tiny, cond, monkeypatch):
    """Prompt-to-prompt style control: CrossAttention.forward replaced by code that reads scale, heads, to_*."""
    from ldm.modules.attention import CrossAttention

    unet = tiny.model.diffusion_model
    cross_layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert cross_layers and all(m.__class__.__name__ == "CrossAttention" for m in cross_layers)
    calls, weight = [], {"token_1": 1.0}

    def controlled_forward(self, x, context=None, mask=None):
        h, is_cross = self.heads, context is not None
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        if is_cross:
            calls.append(self)
            attn = attn.clone()
            attn[..., 1] = attn[..., 1] * weight["token_1"]  # reweight one prompt token
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(out)

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))

    def run():
        torch.manual_seed(0)
        return tiny.sample(cond, batch_size=2, x_T=x_T, timesteps=3, verbose=False)

    base = run()
    monkeypatch.setattr(CrossAttention, "forward", controlled_forward)
    same = run()
    assert len(calls) == 3 * len(cross_layers)  # every cross-attention layer at every step
    assert {id(m) for m in calls} == {id(m) for m in cross_layers}
    torch.testing.assert_close(same, base, rtol=1e-4, atol=1e-4)  # the explicit math is the layer's
    weight["token_1"] = 5.0
    assert not torch.allclose(run(), base, atol=1e-3)
    # Per-instance replacement (what prompt-to-prompt's register_attention_control does) works too.
    monkeypatch.undo()
    calls.clear()
    try:
        for m in cross_layers:
            m.forward = types.MethodType(controlled_forward, m)
        run()
    finally:
        for m in cross_layers:
            del m.forward
    assert len(calls) == 3 * len(cross_layers)
    calls.clear()
    torch.testing.assert_close(run(), base)  # and removing it restores the layer
    assert not calls


# ---- ldm.util -------------------------------------------------------------------------------

def test_log_txt_as_img():
    from ldm.util import log_txt_as_img

    images = log_txt_as_img((48, 24), ["hello world", "", "a much longer caption that has to wrap"], size=10)
    assert images.shape == (3, 3, 24, 48) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[1], torch.ones(3, 24, 48))  # no text: white
    assert images[0].min() < 0 and images[2].min() < 0  # ink
    assert not torch.equal(images[0], images[2])
    tiny_font = log_txt_as_img((16, 16), ["x"], size=0)  # CompVis passes H // 25: 0 for small images
    assert tiny_font.shape == (1, 3, 16, 16)


def test_util_helpers(capsys):
    from ldm import util

    assert util.exists(0) and not util.exists(None)
    assert util.default(None, lambda: 3) == 3 and util.default(None, 4) == 4 and util.default(0, 5) == 0
    assert util.ismap(torch.zeros(1, 4, 2, 2)) and not util.ismap(torch.zeros(1, 3, 2, 2)) and not util.ismap([1])
    assert util.isimage(torch.zeros(2, 3, 2, 2)) and util.isimage(torch.zeros(2, 1, 2, 2))
    assert not util.isimage(torch.zeros(2, 4, 2, 2)) and not util.isimage(torch.zeros(3, 2, 2)) and not util.isimage(None)
    t = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(util.mean_flat(t), torch.tensor([5.5, 17.5]))
    assert util.count_params(torch.nn.Linear(3, 2)) == 8
    assert util.count_params(torch.nn.Linear(3, 2), verbose=True) == 8
    assert "Linear has 0.00 M params." in capsys.readouterr().out
    doubled = util.parallel_data_prefetch(lambda part: part * 2, np.arange(10), 3, cpu_intensive=False)
    np.testing.assert_array_equal(doubled, np.arange(10) * 2)
    ids = util.parallel_data_prefetch(lambda part, worker_id: [worker_id] * len(part), list(range(5)), 2,
                                      target_data_type="list", cpu_intensive=False, use_worker_id=True)
    assert ids == [0, 0, 0, 1, 1]
    with warnings.catch_warnings():  # without CUDA, torch warns that it disables autocast
        warnings.simplefilter("ignore")
        assert util.autocast(lambda a, b=1: a + b)(1, b=2) == 3


def test_adamw_with_ema_steps_like_adamw_and_averages_the_iterates():
    from ldm.util import AdamWwithEMAandWings

    torch.manual_seed(0)
    target = torch.randn(5)
    p1, p2 = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    ours = AdamWwithEMAandWings([p1], lr=0.1, ema_decay=0.9999)
    plain = torch.optim.AdamW([p2], lr=0.1)
    iterates = []
    for _ in range(6):
        for p, opt in ((p1, ours), (p2, plain)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
        iterates.append(p1.detach().clone())
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    # decay min(0.9999, 1 - 1/n) makes the average the running mean of the iterates
    torch.testing.assert_close(ours.state[p1]["param_exp_avg"], torch.stack(iterates).mean(0), rtol=1e-5, atol=1e-6)
