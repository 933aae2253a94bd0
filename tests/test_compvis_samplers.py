"""The CompVis / SD 2 sampler classes (DDIMSampler, PLMSSampler) and ``diffusionmodules.util``.

References are closed forms (DDIM's update written out from the raw network output, the schedule
formulas, the Gaussian-data ODE), diffusers' timestep spacing, and upstream's public signatures
written down here as data. The per-step loops (``ddim_sampling`` / ``plms_sampling``) are checked
against the shared-core path that ``sample()`` takes by default.
"""
import functools
import inspect
import math

import numpy as np
import pytest
import torch

from ldm.api import build_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules import util
from tests.helpers import randomize_, rel_err
from tests.test_sampling_analytic import MU, S as DATA_STD, GaussianOracle

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SCALE = 8, 4.0
SHAPE = (4, 8, 8)


def closed_form_alphas_cumprod() -> np.ndarray:
    """SD's schedule: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


@functools.lru_cache(maxsize=None)
def tiny_model(config: str):
    torch.manual_seed(0)
    model = build_model(config).eval()
    randomize_(model.model.diffusion_model, seed=1)
    with torch.no_grad():  # keep the random UNet's output near a trained model's scale
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    g = torch.Generator().manual_seed(2)
    c, uc = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    x_T = torch.randn(2, *SHAPE, generator=g)
    return model, c, uc, x_T


@pytest.fixture(params=["configs/tiny/tiny-sd1.yaml", "configs/tiny/tiny-sd2-v.yaml"], ids=["eps", "v"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_eps():
    return tiny_model("configs/tiny/tiny-sd1.yaml")


@torch.no_grad()
def reference_eps_x0(model, x, t, c, uc, scale):
    """eps and x0 from the raw network output, guided, converted by the textbook formulas (float64)."""
    out_c = model.apply_model(x, t, c)
    out = out_c if uc is None or scale == 1 else model.apply_model(x, t, uc) + scale * (out_c - model.apply_model(x, t, uc))
    a = torch.from_numpy(closed_form_alphas_cumprod())[t].reshape(-1, 1, 1, 1)
    x, out = x.double(), out.double()
    if model.parameterization == "eps":
        return out, (x - (1 - a).sqrt() * out) / a.sqrt()
    return (1 - a).sqrt() * x + a.sqrt() * out, a.sqrt() * x - (1 - a).sqrt() * out


def ddim_coefficients(timesteps, index, eta):
    """(a_t, a_prev, sigma_t) of DDIM step ``index`` (Song et al. 2020, eq. 16), from the closed-form schedule."""
    ac = closed_form_alphas_cumprod()
    a = ac[timesteps[index]]
    a_prev = ac[timesteps[index - 1]] if index > 0 else ac[0]
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    return a, a_prev, sigma


# ---- the loop equals the core path ---------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_sampling_loop_equals_the_core_path(tiny, eta):
    model, c, uc, x_T = tiny
    sampler = DDIMSampler(model)
    kw = dict(conditioning=c, eta=eta, x_T=x_T, unconditional_guidance_scale=SCALE, unconditional_conditioning=uc,
              verbose=False, log_every_t=3)
    torch.manual_seed(11)
    core, inter_core = sampler.sample(STEPS, 2, SHAPE, **kw)
    torch.manual_seed(11)  # eta > 0: both paths draw the same step noise from the global generator
    sampler.make_schedule(STEPS, ddim_eta=eta, verbose=False)
    loop, inter_loop = sampler.ddim_sampling(c, (2, *SHAPE), x_T=x_T, unconditional_guidance_scale=SCALE,
                                             unconditional_conditioning=uc, log_every_t=3)
    assert core.std() > 0.1
    assert rel_err(loop, core) < 1e-5, rel_err(loop, core)
    # Upstream's log: the start, the first step, then every index (= steps left) divisible by log_every_t.
    logged = [i for i in range(STEPS) if (STEPS - 1 - i) % 3 == 0 or i == 0]
    assert len(inter_core["x_inter"]) == len(inter_loop["x_inter"]) == len(inter_core["pred_x0"]) == 1 + len(logged)
    for key in ("x_inter", "pred_x0"):
        for a, b in zip(inter_core[key], inter_loop[key]):
            assert rel_err(a, b) < 1e-5
    assert torch.equal(inter_core["x_inter"][-1], core)


def test_plms_sampling_loop_equals_the_core_path(tiny):
    model, c, uc, x_T = tiny
    sampler = PLMSSampler(model)
    core, _ = sampler.sample(STEPS, 2, SHAPE, conditioning=c, x_T=x_T, unconditional_guidance_scale=SCALE,
                             unconditional_conditioning=uc, verbose=False)
    loop, inter = sampler.plms_sampling(c, (2, *SHAPE), x_T=x_T, unconditional_guidance_scale=SCALE,
                                        unconditional_conditioning=uc)
    assert rel_err(loop, core) < 1e-5, rel_err(loop, core)
    ddim, _ = DDIMSampler(model).sample(STEPS, 2, SHAPE, conditioning=c, x_T=x_T, unconditional_guidance_scale=SCALE,
                                        unconditional_conditioning=uc, verbose=False)
    assert rel_err(loop, ddim) > 1e-3  # and PLMS is not DDIM
    assert len(inter["pred_x0"]) == 3  # start, first step, last step


# ---- single steps against closed forms ---------------------------------------------------------

@pytest.mark.parametrize("index,eta,temperature", [(5, 0.0, 1.0), (3, 0.8, 1.0), (0, 0.8, 0.5), (4, 1.0, 0.0)])
def test_p_sample_ddim_is_the_closed_form_ddim_update(tiny, index, eta, temperature):
    model, c, uc, x_T = tiny
    sampler = DDIMSampler(model)
    sampler.make_schedule(STEPS, ddim_eta=eta, verbose=False)
    ts = sampler.ddim_timesteps
    x = x_T * 0.8
    t = torch.full((2,), int(ts[index]), dtype=torch.long)
    torch.manual_seed(5)
    x_prev, pred_x0 = sampler.p_sample_ddim(x, c, t, index, unconditional_guidance_scale=SCALE,
                                            unconditional_conditioning=uc, temperature=temperature)
    torch.manual_seed(5)
    noise = torch.randn(x.shape).double()
    eps, x0 = reference_eps_x0(model, x, t, c, uc, SCALE)
    a, a_prev, sigma = ddim_coefficients(ts, index, eta)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * temperature * noise
    torch.testing.assert_close(pred_x0.double(), x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(x_prev.double(), expected, rtol=1e-4, atol=2e-4)


def test_temperature_zero_is_deterministic_but_not_eta_zero():
    """temperature=0 removes the injected noise but keeps eta's smaller direction term sqrt(1 - a_prev - sigma^2):
    a different deterministic map than DDIM at eta=0. noise_dropout=1 drops all the noise, so it is the same map."""
    sampler = DDIMSampler(GaussianOracle("eps"))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(x_T=x_T, verbose=False)
    torch.manual_seed(1)
    cold = sampler.sample(STEPS, 2, (1, 8, 8), eta=1.0, temperature=0.0, **kw)[0]
    torch.manual_seed(2)
    assert torch.equal(sampler.sample(STEPS, 2, (1, 8, 8), eta=1.0, temperature=0.0, **kw)[0], cold)
    torch.manual_seed(3)
    dropped = sampler.sample(STEPS, 2, (1, 8, 8), eta=1.0, noise_dropout=1.0, **kw)[0]
    torch.testing.assert_close(dropped, cold, rtol=0, atol=1e-6)
    eta0 = sampler.sample(STEPS, 2, (1, 8, 8), eta=0.0, **kw)[0]
    assert rel_err(cold, eta0) > 1e-2
    # Its last step, written out: no noise, direction sqrt(1 - a_prev - sigma^2) eps.
    sampler.make_schedule(STEPS, ddim_eta=1.0, verbose=False)
    t = torch.full((2,), int(sampler.ddim_timesteps[0]), dtype=torch.long)
    x_prev, x0 = sampler.p_sample_ddim(x_T, None, t, 0, temperature=0.0)
    a, a_prev, sigma = ddim_coefficients(sampler.ddim_timesteps, 0, 1.0)
    eps = (x_T.double() - math.sqrt(a) * x0.double()) / math.sqrt(1 - a)
    expected = math.sqrt(a_prev) * x0.double() + math.sqrt(1 - a_prev - sigma**2) * eps
    torch.testing.assert_close(x_prev.double(), expected, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    noisy = sampler.sample(STEPS, 2, (1, 8, 8), eta=1.0, temperature=0.5, **kw)[0]
    assert rel_err(noisy, cold) > 1e-2


def test_p_sample_plms_is_the_closed_form_adams_bashforth_step(tiny):
    model, c, uc, x_T = tiny
    sampler = PLMSSampler(model)
    sampler.make_schedule(STEPS, verbose=False)
    ts, index = sampler.ddim_timesteps, 4
    t = torch.full((2,), int(ts[index]), dtype=torch.long)
    g = torch.Generator().manual_seed(9)
    old = [torch.randn(2, *SHAPE, generator=g) for _ in range(3)]
    x_prev, pred_x0, e_t = sampler.p_sample_plms(x_T, c, t, index, unconditional_guidance_scale=SCALE,
                                                 unconditional_conditioning=uc, old_eps=old, t_next=t)
    eps, _ = reference_eps_x0(model, x_T, t, c, uc, SCALE)
    torch.testing.assert_close(e_t.double(), eps, rtol=1e-4, atol=2e-4)
    e_prime = (55 * eps - 59 * old[-1].double() + 37 * old[-2].double() - 9 * old[-3].double()) / 24
    a, a_prev, _ = ddim_coefficients(ts, index, 0.0)
    x0 = (x_T.double() - math.sqrt(1 - a) * e_prime) / math.sqrt(a)
    torch.testing.assert_close(pred_x0.double(), x0, rtol=1e-4, atol=5e-4)
    torch.testing.assert_close(x_prev.double(), math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e_prime,
                               rtol=1e-4, atol=5e-4)
    # No history: the pseudo improved Euler step, the model's second call at t_next on the DDIM prediction.
    t_next = torch.full((2,), int(ts[index - 1]), dtype=torch.long)
    x_prev, _, _ = sampler.p_sample_plms(x_T, c, t, index, old_eps=[], t_next=t_next)
    eps1, x01 = reference_eps_x0(model, x_T, t, c, None, 1.0)
    x_mid = (math.sqrt(a_prev) * x01 + math.sqrt(1 - a_prev) * eps1).float()
    eps2, _ = reference_eps_x0(model, x_mid, t_next, c, None, 1.0)
    e_prime = (eps1 + eps2) / 2
    expected = math.sqrt(a_prev) * (x_T.double() - math.sqrt(1 - a) * e_prime) / math.sqrt(a) + math.sqrt(1 - a_prev) * e_prime
    torch.testing.assert_close(x_prev.double(), expected, rtol=1e-4, atol=5e-4)


def test_plms_dynamic_threshold_caps_the_rms_of_pred_x0():
    model = GaussianOracle("eps")
    sampler = PLMSSampler(model)
    sampler.make_schedule(10, verbose=False)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 3.0, 9.0]).reshape(3, 1, 1, 1)
    t = torch.full((3,), int(sampler.ddim_timesteps[2]), dtype=torch.long)
    _, free, _ = sampler.p_sample_plms(x, None, t, 2, old_eps=[torch.zeros_like(x)] * 3)
    _, capped, _ = sampler.p_sample_plms(x, None, t, 2, old_eps=[torch.zeros_like(x)] * 3, dynamic_threshold=2.0)
    rms = free.pow(2).flatten(1).mean(1).sqrt()
    expected = torch.where(rms.reshape(-1, 1, 1, 1) > 2.0, free * 2.0 / rms.reshape(-1, 1, 1, 1), free)
    assert (rms > 2.0).any() and (rms < 2.0).any()
    torch.testing.assert_close(capped, expected)
    with pytest.raises(NotImplementedError, match="dynamic_threshold"):
        DDIMSampler(model).sample(4, 1, (1, 4, 4), dynamic_threshold=1.0, verbose=False)


# ---- per-step features -------------------------------------------------------------------------

def test_ucg_schedule(tiny_eps):
    model, c, uc, x_T = tiny_eps
    sampler = DDIMSampler(model)
    kw = dict(conditioning=c, x_T=x_T, unconditional_conditioning=uc, verbose=False)
    plain = sampler.sample(STEPS, 2, SHAPE, unconditional_guidance_scale=SCALE, **kw)[0]
    const = sampler.sample(STEPS, 2, SHAPE, ucg_schedule=[SCALE] * STEPS, **kw)[0]
    assert rel_err(const, plain) < 1e-5

    class Spy(DDIMSampler):
        def p_sample_ddim(self, *args, **kwargs):
            self.scales.append(kwargs["unconditional_guidance_scale"])
            return super().p_sample_ddim(*args, **kwargs)

    spy = Spy(model)
    spy.scales = []
    schedule = list(np.linspace(8.0, 1.5, STEPS))
    varying = spy.sample(STEPS, 2, SHAPE, ucg_schedule=schedule, **kw)[0]
    assert spy.scales == schedule  # step i uses the i-th scale, highest noise first
    assert rel_err(varying, plain) > 1e-3
    with pytest.raises(ValueError, match="ucg_schedule"):
        sampler.sample(STEPS, 2, SHAPE, ucg_schedule=[SCALE] * (STEPS - 1), **kw)


def test_score_corrector_gets_upstreams_arguments_and_changes_eps():
    model = GaussianOracle("eps")
    sampler = DDIMSampler(model)
    calls = []

    class Corrector:
        def modify_score(self, model_, e_t, x, t, c, **kwargs):
            calls.append((model_, x.clone(), t.clone(), c, kwargs))
            return e_t + kwargs["shift"]

    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.zeros(2, 3)
    out, _ = sampler.sample(5, 2, (1, 8, 8), conditioning=cond, x_T=x_T, score_corrector=Corrector(),
                            corrector_kwargs={"shift": 0.1}, verbose=False)
    plain, _ = sampler.sample(5, 2, (1, 8, 8), conditioning=cond, x_T=x_T, verbose=False)
    assert len(calls) == 5 and all(m is model and cc is cond and kw == {"shift": 0.1} for m, _, _, cc, kw in calls)
    assert [int(t[0]) for _, _, t, _, _ in calls] == list(sampler.ddim_timesteps[::-1])
    assert torch.equal(calls[0][1], x_T)
    assert (out - plain).abs().mean() > 1e-3
    # One step: shifting eps by d moves x_prev by d * (sqrt(1 - a_prev) - sqrt(a_prev) * sqrt(1 - a) / sqrt(a)).
    index = 3
    t = torch.full((2,), int(sampler.ddim_timesteps[index]), dtype=torch.long)
    shifted, _ = sampler.p_sample_ddim(x_T, cond, t, index, score_corrector=Corrector(), corrector_kwargs={"shift": 0.1})
    base, _ = sampler.p_sample_ddim(x_T, cond, t, index)
    a, a_prev, _ = ddim_coefficients(sampler.ddim_timesteps, index, 0.0)
    torch.testing.assert_close(shifted - base, torch.full_like(base, 0.1 * (math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a) / a))),
                               rtol=1e-4, atol=1e-5)


def test_a_subclass_overriding_p_sample_ddim_is_used_by_sample_and_decode(tiny_eps):
    model, c, uc, x_T = tiny_eps

    class Counting(DDIMSampler):
        calls = 0

        def p_sample_ddim(self, x, c, t, index, **kwargs):
            Counting.calls += 1
            return super().p_sample_ddim(x, c, t, index, **kwargs)

    sampler = Counting(model)
    out, _ = sampler.sample(STEPS, 2, SHAPE, conditioning=c, x_T=x_T, verbose=False)
    assert Counting.calls == STEPS
    plain, _ = DDIMSampler(model).sample(STEPS, 2, SHAPE, conditioning=c, x_T=x_T, verbose=False)
    assert rel_err(out, plain) < 1e-5
    sampler.decode(x_T, c, 3)
    assert Counting.calls == STEPS + 3

    class Zero(DDIMSampler):
        def p_sample_ddim(self, x, *args, **kwargs):
            return torch.zeros_like(x), torch.zeros_like(x)

    assert torch.equal(Zero(model).sample(STEPS, 2, SHAPE, conditioning=c, x_T=x_T, verbose=False)[0], torch.zeros_like(x_T))


def test_mask_blends_the_noised_known_latent_each_step():
    model = GaussianOracle("eps")
    sampler = DDIMSampler(model)
    x0 = torch.full((1, 1, 16, 16), 2.0)
    mask = torch.zeros_like(x0)
    mask[..., :8] = 1
    x_T = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    out, _ = sampler.sample(20, 1, (1, 16, 16), x_T=x_T, mask=mask, x0=x0, verbose=False)
    # The kept half enters the last step as q_sample(x0, t=1) (noise std ~0.04): close to x0, not equal.
    assert (out[..., :8] - 2.0).abs().max() < 0.2 and not torch.equal(out[..., :8], x0[..., :8])
    assert (out[..., 8:].mean() - 2.0).abs() > 0.5
    none_kept, _ = sampler.sample(20, 1, (1, 16, 16), x_T=x_T, mask=torch.zeros_like(x0), x0=x0, verbose=False)
    plain, _ = sampler.sample(20, 1, (1, 16, 16), x_T=x_T, verbose=False)
    assert rel_err(none_kept, plain) < 1e-5
    with pytest.raises(ValueError, match="x0"):
        sampler.sample(20, 1, (1, 16, 16), mask=mask, verbose=False)


def test_quantize_x0_needs_a_vq_first_stage(tiny_eps):
    model, c, _, x_T = tiny_eps
    with pytest.raises(ValueError, match="quantize"):
        DDIMSampler(model).sample(STEPS, 2, SHAPE, conditioning=c, quantize_x0=True, verbose=False)
    oracle = GaussianOracle("eps")
    oracle.first_stage_model = torch.nn.Module()
    oracle.first_stage_model.quantize = lambda z: (z.round(), None, (None, None, None))
    sampler = DDIMSampler(oracle)
    sampler.make_schedule(10, verbose=False)
    t = torch.full((1,), int(sampler.ddim_timesteps[4]), dtype=torch.long)
    _, pred_x0 = sampler.p_sample_ddim(torch.randn(1, 1, 4, 4), None, t, 4, quantize_denoised=True)
    assert torch.equal(pred_x0, pred_x0.round())
    out, _ = sampler.sample(10, 1, (1, 4, 4), quantize_x0=True, verbose=False)
    assert torch.isfinite(out).all()


# ---- schedule tables and step counts -------------------------------------------------------------

def test_make_schedule_tables_types_and_closed_forms(tiny_eps):
    model = tiny_eps[0]
    sampler = DDIMSampler(model)
    sampler.make_schedule(20, ddim_eta=1.0, verbose=False)
    ts = sampler.ddim_timesteps
    assert isinstance(ts, np.ndarray) and ts.dtype.kind == "i" and np.array_equal(ts, np.arange(0, 1000, 50) + 1)
    ac = closed_form_alphas_cumprod()
    prev = np.append(1.0, ac[:-1])
    expected = {"betas": 1 - ac / prev, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
                "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
                "log_one_minus_alphas_cumprod": np.log(1 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1 / ac),
                "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
                "ddim_sigmas_for_original_num_steps": np.sqrt((1 - prev) / (1 - ac) * (1 - ac / prev))}
    for name, value in expected.items():
        got = getattr(sampler, name)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.shape == (1000,), name
        # 1 - a_t / a_(t-1) of float32 alphas (the model's buffer) keeps about 4 digits
        rtol = 2e-4 if name == "ddim_sigmas_for_original_num_steps" else 1e-5
        np.testing.assert_allclose(got.numpy(), value, rtol=rtol, atol=1e-7, err_msg=name)
    a, a_prev = ac[ts], np.append(ac[0], ac[ts[:-1]])
    assert isinstance(sampler.ddim_alphas, torch.Tensor) and sampler.ddim_alphas.dtype == torch.float32
    assert isinstance(sampler.ddim_sqrt_one_minus_alphas, torch.Tensor)
    assert isinstance(sampler.ddim_sigmas, torch.Tensor) and sampler.ddim_sigmas.dtype == torch.float64
    assert isinstance(sampler.ddim_alphas_prev, np.ndarray) and sampler.ddim_alphas_prev.dtype == np.float64
    assert torch.equal(sampler.ddim_alphas, model.alphas_cumprod[torch.from_numpy(ts)])
    np.testing.assert_allclose(sampler.ddim_alphas_prev, a_prev, rtol=1e-6)
    np.testing.assert_allclose(sampler.ddim_sqrt_one_minus_alphas.numpy(), np.sqrt(1 - a), rtol=1e-5)
    np.testing.assert_allclose(sampler.ddim_sigmas.numpy(), np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)), rtol=1e-5)
    assert all(t.shape == (20,) for t in (sampler.ddim_alphas, sampler.ddim_sigmas, sampler.ddim_sqrt_one_minus_alphas))


@pytest.mark.parametrize("steps", [1, 3, 7, 20, 30, 50, 333, 999])
def test_exactly_the_asked_steps_as_diffusers_leading_spacing(steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    ours = util.make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert len(ours) == steps and ours.max() < 1000
    assert np.array_equal(ours, np.sort(sched.timesteps.numpy()))
    if 1000 % steps == 0:  # where upstream's rule works, it is upstream's array
        assert np.array_equal(ours, np.arange(0, 1000, 1000 // steps) + 1)


def test_tiny_and_odd_step_counts_sample():
    model = GaussianOracle("eps")
    for steps in (1, 3, 30, 1000):
        sampler = DDIMSampler(model)
        sampler.make_schedule(steps, verbose=False)
        assert len(sampler.ddim_timesteps) == steps and sampler.ddim_timesteps.max() <= 999
    assert np.array_equal(util.make_ddim_timesteps("uniform", 1000, 1000, verbose=False), np.arange(1000))
    for cls in (DDIMSampler, PLMSSampler):
        for steps in (1, 3):
            out, _ = cls(model).sample(steps, 1, (1, 4, 4), verbose=False)
            assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="steps"):
        DDIMSampler(model).make_schedule(0, verbose=False)


def test_util_ddim_helpers_against_closed_forms(capsys):
    quad = util.make_ddim_timesteps("quad", 10, 1000, verbose=True)
    assert np.array_equal(quad, (np.linspace(0, math.sqrt(800), 10) ** 2).astype(int) + 1)
    assert "Selected timesteps" in capsys.readouterr().out
    with pytest.raises(NotImplementedError, match="cubic"):
        util.make_ddim_timesteps("cubic", 10, 1000)
    ac = closed_form_alphas_cumprod()
    ts = np.array([1, 101, 201, 301])
    for alphacums in (ac, torch.tensor(ac, dtype=torch.float32)):
        sigmas, alphas, alphas_prev = util.make_ddim_sampling_parameters(alphacums, ts, eta=0.5, verbose=False)
        assert isinstance(alphas_prev, np.ndarray)
        assert type(sigmas) is type(alphas) is type(alphacums)
        a = np.asarray(alphacums, dtype=np.float64)[ts]
        ap = np.asarray(alphacums, dtype=np.float64)[[0, 1, 101, 201]]
        np.testing.assert_allclose(np.asarray(alphas), a)
        np.testing.assert_allclose(alphas_prev, ap)
        np.testing.assert_allclose(np.asarray(sigmas), 0.5 * np.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), rtol=1e-12)


# ---- img2img: encode / decode / stochastic_encode -----------------------------------------------

def exact_ode(z: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Gaussian data's probability-flow ODE in the VP latent, from level sigma_from to sigma_to (VE sigmas)."""
    x = z.double() * math.sqrt(1 + sigma_from**2)
    x = MU + (x - MU) * math.sqrt((DATA_STD**2 + sigma_to**2) / (DATA_STD**2 + sigma_from**2))
    return x / math.sqrt(1 + sigma_to**2)


@pytest.mark.parametrize("param", ["eps", "v"])
def test_encode_is_ddim_inversion_and_decode_undoes_it(param):
    model = GaussianOracle(param)
    x0 = MU + DATA_STD * torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ve = lambda a: math.sqrt((1 - a) / a)  # noqa: E731
    enc_err, rec_err = [], []
    for steps in (50, 200):
        sampler = DDIMSampler(model)
        sampler.make_schedule(steps, verbose=False)
        t_enc = steps * 4 // 5
        encoded, out = sampler.encode(x0, None, t_enc, return_intermediates=4)
        assert torch.equal(out["x_encoded"], encoded) and len(out["intermediates"]) == len(out["intermediate_steps"])
        assert out["intermediate_steps"][-1] == t_enc - 1
        exact = exact_ode(x0, ve(float(sampler.ddim_alphas_prev[0])), ve(float(sampler.ddim_alphas[t_enc - 1])))
        enc_err.append((encoded.double() - exact).abs().max().item())
        decoded = sampler.decode(encoded, None, t_enc)
        rec_err.append((decoded.double() - x0.double()).abs().max().item())
    assert enc_err[1] < 0.04 and rec_err[1] < 0.01, (enc_err, rec_err)
    assert enc_err[1] < enc_err[0] / 2.5 and rec_err[1] < rec_err[0] / 2.5, (enc_err, rec_err)  # first order
    assert (encoded.mean() - x0.mean()).abs() > 0.3  # really moved to a noisy level (mean -> sqrt(a) * MU)


def test_stochastic_encode_and_original_steps_decode():
    model = GaussianOracle("eps")
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    x0 = torch.full((2, 1, 4, 4), 0.7)
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 7])
    z = sampler.stochastic_encode(x0, t, noise=noise)
    ac = closed_form_alphas_cumprod()
    a = torch.from_numpy(ac[sampler.ddim_timesteps[[3, 7]]]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(z.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=1e-5, atol=1e-6)
    z = sampler.stochastic_encode(x0, torch.tensor([5, 500]), use_original_steps=True, noise=noise)
    a = torch.from_numpy(ac[[5, 500]]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(z.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(), rtol=1e-5, atol=1e-6)
    # decode over the trained steps ends at alpha_bar = 1 (the data), through the same ODE.
    z = sampler.stochastic_encode(x0, torch.tensor([200, 200]), use_original_steps=True, noise=noise)
    out = sampler.decode(z, None, 201, use_original_steps=True)
    exact = exact_ode(z, math.sqrt((1 - ac[200]) / ac[200]), 0.0)
    assert (out.double() - exact).abs().max() < 5e-3


# ---- API surface ---------------------------------------------------------------------------------

UPSTREAM = {  # Stability-AI/stablediffusion ldm/models/diffusion/{ddim,plms}.py: (name, default) in order
    "DDIMSampler.sample": ["S", "batch_size", "shape", ("conditioning", None), ("callback", None),
                           ("normals_sequence", None), ("img_callback", None), ("quantize_x0", False), ("eta", 0.0),
                           ("mask", None), ("x0", None), ("temperature", 1.0), ("noise_dropout", 0.0),
                           ("score_corrector", None), ("corrector_kwargs", None), ("verbose", True), ("x_T", None),
                           ("log_every_t", 100), ("unconditional_guidance_scale", 1.0),
                           ("unconditional_conditioning", None), ("dynamic_threshold", None), ("ucg_schedule", None)],
    "DDIMSampler.ddim_sampling": ["cond", "shape", ("x_T", None), ("ddim_use_original_steps", False), ("callback", None),
                                  ("timesteps", None), ("quantize_denoised", False), ("mask", None), ("x0", None),
                                  ("img_callback", None), ("log_every_t", 100), ("temperature", 1.0),
                                  ("noise_dropout", 0.0), ("score_corrector", None), ("corrector_kwargs", None),
                                  ("unconditional_guidance_scale", 1.0), ("unconditional_conditioning", None),
                                  ("dynamic_threshold", None), ("ucg_schedule", None)],
    "DDIMSampler.p_sample_ddim": ["x", "c", "t", "index", ("repeat_noise", False), ("use_original_steps", False),
                                  ("quantize_denoised", False), ("temperature", 1.0), ("noise_dropout", 0.0),
                                  ("score_corrector", None), ("corrector_kwargs", None),
                                  ("unconditional_guidance_scale", 1.0), ("unconditional_conditioning", None),
                                  ("dynamic_threshold", None)],
    "DDIMSampler.encode": ["x0", "c", "t_enc", ("use_original_steps", False), ("return_intermediates", None),
                           ("unconditional_guidance_scale", 1.0), ("unconditional_conditioning", None), ("callback", None)],
    "DDIMSampler.stochastic_encode": ["x0", "t", ("use_original_steps", False), ("noise", None)],
    "DDIMSampler.decode": ["x_latent", "cond", "t_start", ("unconditional_guidance_scale", 1.0),
                           ("unconditional_conditioning", None), ("use_original_steps", False), ("callback", None)],
    "DDIMSampler.make_schedule": ["ddim_num_steps", ("ddim_discretize", "uniform"), ("ddim_eta", 0.0), ("verbose", True)],
    "DDIMSampler.register_buffer": ["name", "attr"],
    "PLMSSampler.p_sample_plms": ["x", "c", "t", "index", ("repeat_noise", False), ("use_original_steps", False),
                                  ("quantize_denoised", False), ("temperature", 1.0), ("noise_dropout", 0.0),
                                  ("score_corrector", None), ("corrector_kwargs", None),
                                  ("unconditional_guidance_scale", 1.0), ("unconditional_conditioning", None),
                                  ("old_eps", None), ("t_next", None), ("dynamic_threshold", None)],
    "util.make_ddim_timesteps": ["ddim_discr_method", "num_ddim_timesteps", "num_ddpm_timesteps", ("verbose", True)],
    "util.make_ddim_sampling_parameters": ["alphacums", "ddim_timesteps", "eta", ("verbose", True)],
    "util.noise_like": ["shape", "device", ("repeat", False)],
    "util.betas_for_alpha_bar": ["num_diffusion_timesteps", "alpha_bar", ("max_beta", 0.999)],
    "util.checkpoint": ["func", "inputs", "params", "flag"],
    "util.timestep_embedding": ["timesteps", "dim", ("max_period", 10000), ("repeat_only", False)],
    "util.scale_module": ["module", "scale"],
}
UPSTREAM["PLMSSampler.sample"] = UPSTREAM["DDIMSampler.sample"][:-1]
UPSTREAM["PLMSSampler.plms_sampling"] = UPSTREAM["DDIMSampler.ddim_sampling"][:-1]
UPSTREAM["PLMSSampler.make_schedule"] = UPSTREAM["DDIMSampler.make_schedule"]
OURS_EXTRA = {"DDIMSampler.sample": ["guidance_rescale"], "PLMSSampler.sample": ["guidance_rescale"],
              "util.noise_like": ["generator"]}


def test_constructors_take_devices_and_no_kwargs():
    for cls in (DDIMSampler, PLMSSampler):
        params = list(inspect.signature(cls.__init__).parameters.values())
        assert [p.name for p in params] == ["self", "model", "schedule", "device"] and params[2].default == "linear"


@pytest.mark.parametrize("qualname", sorted(UPSTREAM))
def test_signatures_are_upstreams(qualname):
    owner, name = qualname.split(".")
    fn = getattr({"DDIMSampler": DDIMSampler, "PLMSSampler": PLMSSampler, "util": util}[owner], name)
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    assert all(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    expected = [(e, inspect.Parameter.empty) if isinstance(e, str) else e for e in UPSTREAM[qualname]]
    assert [(p.name, p.default) for p in params[:len(expected)]] == expected
    assert [p.name for p in params[len(expected):]] == OURS_EXTRA.get(qualname, [])


def test_misspelled_keywords_are_type_errors():
    model, c, x_T = GaussianOracle("eps"), None, torch.zeros(2, *SHAPE)
    with pytest.raises(TypeError, match="devcie"):
        DDIMSampler(model, devcie="cpu")
    sampler = DDIMSampler(model, device="cpu")
    calls = [
        ("unconditional_guidance_scal", lambda: sampler.sample(2, 2, SHAPE, unconditional_guidance_scal=3.0)),
        ("ddim_eta", lambda: sampler.sample(2, 2, SHAPE, ddim_eta=0.5)),
        ("x_t", lambda: sampler.ddim_sampling(c, (2, *SHAPE), x_t=x_T)),
        ("use_orig_steps", lambda: sampler.p_sample_ddim(x_T, c, torch.tensor([1, 1]), 0, use_orig_steps=True)),
        ("unconditional_guidance", lambda: sampler.decode(x_T, c, 1, unconditional_guidance=2.0)),
        ("return_intermediate", lambda: sampler.encode(x_T, c, 1, return_intermediate=2)),
        ("ucg_schedule", lambda: PLMSSampler(model).sample(2, 2, SHAPE, ucg_schedule=[1.0, 1.0])),
        ("old_eps_list", lambda: PLMSSampler(model).p_sample_plms(x_T, c, torch.tensor([1, 1]), 0, old_eps_list=[])),
    ]
    for name, call in calls:
        with pytest.raises(TypeError, match=name):
            call()
    with pytest.raises(ValueError, match="PLMS"):
        PLMSSampler(model).sample(2, 2, SHAPE, eta=0.5, verbose=False)


def test_device_and_register_buffer():
    model = GaussianOracle("eps")
    assert DDIMSampler(model).device == torch.device("cpu")
    sampler = DDIMSampler(model, device="meta")
    sampler.register_buffer("foo", torch.ones(3))
    sampler.register_buffer("bar", np.ones(3))
    assert sampler.foo.device.type == "meta" and isinstance(sampler.bar, np.ndarray)
    sampler = PLMSSampler(model, schedule="linear", device=torch.device("cpu"))
    sampler.make_schedule(10, verbose=False)
    assert sampler.ddim_alphas.device.type == "cpu" and sampler.ddim_sigmas.abs().max() == 0


# ---- diffusionmodules.util ---------------------------------------------------------------------

def test_util_building_blocks():
    k = 3.0
    betas = util.betas_for_alpha_bar(100, lambda t: math.exp(-k * t))
    np.testing.assert_allclose(betas, np.full(100, 1 - math.exp(-k / 100)), rtol=1e-12)
    assert util.betas_for_alpha_bar(10, lambda t: 1 - t).max() == 0.999  # capped at max_beta
    cos = util.make_beta_schedule("squaredcos_cap_v2", 1000)
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.cumprod(1 - cos)[:900], [ab((i + 1) / 1000) / ab(0) for i in range(900)], rtol=1e-9)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(util.mean_flat(x), x.reshape(2, -1).mean(1))
    torch.testing.assert_close(util.SiLU()(x), torch.nn.functional.silu(x))
    lin = torch.nn.Linear(3, 3)
    w = lin.weight.detach().clone()
    assert util.scale_module(lin, 0.5) is lin and torch.equal(lin.weight, w * 0.5)
    assert isinstance(util.conv_nd(1, 2, 2, 3), torch.nn.Conv1d) and isinstance(util.avg_pool_nd(3, 2), torch.nn.AvgPool3d)
    with pytest.raises(ValueError, match="unsupported dimensions"):
        util.conv_nd(4, 2, 2, 3)
    torch.manual_seed(0)
    rep = util.noise_like((3, 2, 2), "cpu", repeat=True)
    assert torch.equal(rep[0], rep[2]) and not torch.equal(util.noise_like((3, 2), "cpu")[0], util.noise_like((3, 2), "cpu")[1])
    t = torch.tensor([1, 5])
    assert torch.equal(util.timestep_embedding(t, 4, repeat_only=True), torch.tensor([[1] * 4, [5] * 4]))
    assert isinstance(util.normalization(64), util.GroupNorm32)
    hybrid = util.HybridConditioner({"target": "torch.nn.Identity"}, {"target": "torch.nn.Identity"})
    out = hybrid(x, x + 1)
    assert torch.equal(out["c_concat"][0], x) and torch.equal(out["c_crossattn"][0], x + 1)


def test_checkpoint_function_gives_the_plain_gradients():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    f = lambda v: torch.tanh(lin(v)).pow(2)  # noqa: E731
    f(x).sum().backward()
    gx, gw = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    out = util.CheckpointFunction.apply(f, 1, x, *lin.parameters())
    assert out.grad_fn is not None
    out.sum().backward()
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(lin.weight.grad, gw)
    x.grad, lin.weight.grad = None, None
    util.checkpoint(f, (x,), list(lin.parameters()), True).sum().backward()
    torch.testing.assert_close(lin.weight.grad, gw)
