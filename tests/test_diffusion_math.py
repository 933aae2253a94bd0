"""Diffusion math checked against closed forms and against diffusers' schedulers."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler
from ldm.models.diffusion import schedule as sched
from ldm.modules.ema import LitEma
from ldm.util import instantiate_from_config

diffusers = pytest.importorskip("diffusers")

TINY = "configs/tiny/tiny-sd1.yaml"


@pytest.mark.parametrize("ours,theirs", [("linear", "scaled_linear"), ("sqrt_linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_beta_schedules_match_diffusers(ours, theirs):
    kw = dict(beta_start=0.00085, beta_end=0.012) if theirs != "squaredcos_cap_v2" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw)
    tables = sched.schedule_tables(ours, 1000, 0.00085, 0.012, cosine_s=0.008)
    np.testing.assert_allclose(tables["betas"], ref.betas.double().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tables["alphas_cumprod"], ref.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-9)


def test_posterior_is_the_bayes_posterior():
    """q(x_{t-1} | x_t, x_0): mean coefficients and variance from the Gaussian product formula."""
    tab = sched.schedule_tables("linear", 1000, 0.00085, 0.012)
    for t in (1, 10, 500, 999):
        a_t, _ab_t, ab_prev = 1 - tab["betas"][t], tab["alphas_cumprod"][t], tab["alphas_cumprod"][t - 1]
        # Precision-weighted combination of N(x_t/sqrt(a_t), (1-a_t)/a_t) and N(sqrt(ab_prev) x0, 1-ab_prev).
        prec = a_t / (1 - a_t) + 1 / (1 - ab_prev)
        var = 1 / prec
        c_xt = var * math.sqrt(a_t) / (1 - a_t)
        c_x0 = var * math.sqrt(ab_prev) / (1 - ab_prev)
        assert tab["posterior_variance"][t] == pytest.approx(var, rel=1e-9)
        assert tab["posterior_mean_coef2"][t] == pytest.approx(c_xt, rel=1e-9)
        assert tab["posterior_mean_coef1"][t] == pytest.approx(c_x0, rel=1e-9)


def test_q_sample_moments():
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    ab = torch.tensor(0.3, dtype=torch.float64)
    xt = sched.q_sample(x0, ab, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert xt.mean().item() == pytest.approx(math.sqrt(0.3) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(0.7, rel=1e-2)


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_parameterizations_round_trip(param):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.999, 0.5, 0.1, 0.003], dtype=torch.float64)
    xt = sched.q_sample(x0, ab, eps)
    target = sched.training_target(x0, eps, ab, param)
    got_x0, got_eps = sched.to_x0_eps(target, xt, ab, param)
    torch.testing.assert_close(got_x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=1e-9, atol=1e-9)


def test_v_target_matches_diffusers():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(2)
    x0, eps, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 400, 999])
    tab = sched.schedule_tables("linear", 1000, 0.00085, 0.012)
    ab = torch.tensor(tab["alphas_cumprod"], dtype=torch.float32)[t]
    torch.testing.assert_close(sched.v_from(x0, eps, ab), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.q_sample(x0, ab, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)


def tiny_model(**overrides):
    cfg = OmegaConf.load(TINY).model
    for k, v in overrides.items():
        cfg.params[k] = v
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


@pytest.mark.parametrize("param", ["eps", "v", "x0"])
def test_loss_is_zero_for_an_oracle_and_mse_otherwise(param, monkeypatch):
    model = tiny_model(parameterization=param)
    x0 = torch.randn(2, 4, 8, 8)
    noise, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    ab = model.alphas_cumprod[t]
    target = sched.training_target(x0, noise, ab, param)
    monkeypatch.setattr(model, "apply_model", lambda x, tt, c: target)
    loss, logs = model.p_losses(x0, None, t, noise=noise)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(model, "apply_model", lambda x, tt, c: target + 0.5)
    loss, logs = model.p_losses(x0, None, t, noise=noise)
    assert loss.item() == pytest.approx(0.25, rel=1e-6)
    assert set(logs) >= {"train/loss", "train/loss_simple"}


def test_min_snr_weighting():
    model = tiny_model(snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 999])
    snr = model.alphas_cumprod[t] / (1 - model.alphas_cumprod[t])
    torch.testing.assert_close(model.timestep_weights(t), torch.clamp(snr, max=5.0) / snr)


def test_ema_follows_closed_form():
    net = torch.nn.Linear(2, 2)
    ema = LitEma(net, decay=0.9)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema(net)  # num_updates=1: decay = min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.weight, d * start + (1 - d) * net.weight.detach())
    with ema.average_parameters(net):
        torch.testing.assert_close(net.weight.detach(), ema.weight)
    torch.testing.assert_close(net.weight.detach(), start + 1.0)  # restored
    assert int(ema.num_updates) == 1 and ema.num_updates.dtype == torch.int32


def test_lr_schedules():
    lin = LambdaLinearScheduler(warm_up_steps=[10], f_min=[0.1], f_max=[1.0], f_start=[0.0], cycle_lengths=[110])
    assert lin(0) == 0.0 and lin(5) == pytest.approx(0.5) and lin(10) == pytest.approx(0.1 + 0.9 * 100 / 110)
    cos = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.0, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.5) and cos(500) == pytest.approx(0.0)


def test_inpaint_input_builds_nine_channels():
    cfg = OmegaConf.load("configs/tiny/tiny-sd1-inpainting.yaml").model
    model = instantiate_from_config(cfg)
    batch = {
        "image": torch.rand(2, 16, 16, 3) * 2 - 1,
        "mask": (torch.rand(2, 16, 16, 1) > 0.5).float(),
        "masked_image": torch.rand(2, 16, 16, 3) * 2 - 1,
        "txt": ["a", "b"],
    }
    z, cond = model.get_input(batch, "image")
    assert z.shape == (2, 4, 8, 8)
    assert cond["c_concat"][0].shape == (2, 5, 8, 8) and cond["c_crossattn"][0].shape == (2, 77, 32)
    out = model.apply_model(z, torch.tensor([1, 2]), cond)
    assert out.shape == z.shape


def test_model_follows_its_device_not_cuda():
    """Run the whole inference path on the meta device: any tensor made on a fixed device would clash."""
    model = tiny_model().to("meta")
    c = model.get_learned_conditioning(["a photo of a cat"])
    assert c.device.type == "meta"
    out = model.apply_model(torch.empty(1, 4, 8, 8, device="meta"), torch.tensor([5], device="meta"), c)
    assert out.device.type == "meta" and out.shape == (1, 4, 8, 8)
    assert model.decode_first_stage(out).shape == (1, 3, 16, 16)


def test_classifier_free_dropout_replaces_prompts():
    model = tiny_model(ucg_training={"txt": {"p": 1.0, "val": ""}}).train()
    dropped = model.drop_conditioning({"txt": ["a", "b"], "image": None})
    assert dropped["txt"] == ["", ""]
    assert model.eval().drop_conditioning({"txt": ["a"]})["txt"] == ["a"]
