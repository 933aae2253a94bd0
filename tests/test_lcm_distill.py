"""LCM-LoRA distillation (ldm.models.diffusion.lcm_distill) and the demo's distilled adapters.

The teacher's step is checked against diffusers' DDIMScheduler, the consistency function against diffusers'
LCMScheduler's boundary scalings, training against the frozen base (bit for bit), and the shipped adapters
against what they were made for: few-step samples close to the teacher's 25-step samples.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ldm.api import load_model
from ldm.lora import has_lora, load_lora
from ldm.models.diffusion.lcm_distill import LCMDistillation, pseudo_huber
from ldm.run_config import resolve_model
from ldm.util import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "ldm" / "assets" / "digits_demo"
LCM_LORA = DEMO / "lcm-lora.safetensors"


@pytest.fixture(scope="module")
def distiller() -> LCMDistillation:
    torch.manual_seed(0)
    m = LCMDistillation(rank=4)
    with torch.no_grad():  # non-trivial adapters (fresh ones are zero: the student would equal the teacher)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return load_model(*resolve_model(None, None))


def contexts(m: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return m.get_learned_conditioning(prompts), m.get_learned_conditioning([""])


def test_teacher_step_is_diffusers_ddim_step_of_the_guided_base_model(distiller, base):
    """One DDIM step (20 timesteps down, the 50-step grid) of the base model's CFG noise, adapters ignored."""
    import diffusers

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 519, 39])
    c, null = contexts(distiller, ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit one"])
    ours = distiller.teacher_step(z, t, t - 20, c, null.expand_as(c))
    with torch.no_grad():
        eps_c, eps_u = base.apply_model(z, t, c), base.apply_model(z, t, null.expand_as(c))
    eps = eps_u + 3.0 * (eps_c - eps_u)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    ddim.set_timesteps(50)
    expected = torch.cat([ddim.step(eps[i:i + 1], int(t[i]), z[i:i + 1]).prev_sample for i in range(3)])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # The adapters were on again afterwards: the student differs from the base model.
    with torch.no_grad():
        assert not torch.allclose(distiller.apply_model(z, t, c), eps_c, atol=1e-4)


def test_consistency_function_uses_diffusers_lcm_boundary_scalings(distiller):
    import diffusers

    lcm = diffusers.LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", set_alpha_to_one=False)
    g = torch.Generator().manual_seed(2)
    z, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 19, 259, 999])
    ours = distiller.consistency(z, t, eps)
    a = lcm.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    for i, ti in enumerate(t.tolist()):
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(ti)
        torch.testing.assert_close(ours[i], c_skip * z[i] + c_out * x0[i], rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[0], z[0])  # the boundary condition: f(z, 0) = z


def test_pseudo_huber_closed_forms():
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1e-4, 3.0])
    assert pseudo_huber(a[:1], b[:1], 0.1).item() == pytest.approx(1e-8 / 0.2, rel=1e-3)  # ~ d^2 / 2c
    assert pseudo_huber(a[1:], b[1:], 1e-3).item() == pytest.approx(3.0 - 1e-3, rel=1e-6)  # ~ |d| - c
    assert pseudo_huber(a, a, 0.5).item() == 0.0


def test_distillation_trains_the_adapters_only(distiller):
    frozen = {k: v.clone() for k, v in distiller.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in distiller.state_dict().items() if "lora_" in k}
    params = [p for p in distiller.parameters() if p.requires_grad]
    assert params and all(any(p is q for n, q in distiller.named_parameters() if "lora_" in n) for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    c, null = contexts(distiller, ["a handwritten digit two"] * 4)
    z0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    distiller.train()
    for _ in range(2):
        loss = distiller.distillation_loss(z0, c, null)
        assert torch.isfinite(loss) and loss.item() > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    distiller.eval()
    after = distiller.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in lora.items())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="solver_steps must divide"):
        LCMDistillation(solver_steps=30)
    with pytest.raises(ConfigError, match="guidance_scale must be >= 1"):
        LCMDistillation(guidance_scale=0.5)


def lcm_row(model: torch.nn.Module, steps: int, guidance: float, per_digit: int = 10) -> tuple[torch.Tensor, float]:
    from ldm.digit_metrics import evaluate_digits

    r = evaluate_digits(model, per_digit=per_digit, seed=100, height=16, width=16, sampler="lcm", steps=steps,
                        guidance_scale=guidance)
    return r["images"], r["digit_accuracy"]


def test_shipped_lcm_lora_samples_near_the_teacher_in_few_steps(base):
    """The demo's LCM-LoRA (made by experiment=lcm_lora_digits): from the same noise, its 1- and 2-step samples
    (guidance 1) land much nearer the teacher's 25-step DDIM samples (guidance 3) than the base model's own
    1- and 2-step LCM samples do, and the classifier still reads the asked-for digits."""
    from ldm.digit_metrics import evaluate_digits

    model = load_model(*resolve_model(None, None))
    teacher = evaluate_digits(model, per_digit=10, seed=100, height=16, width=16, sampler="ddim", steps=25,
                              guidance_scale=3.0)["images"]
    plain = {n: lcm_row(model, n, 3.0) for n in (1, 2)}
    load_lora(model, LCM_LORA)
    assert has_lora(model)
    distilled = {n: lcm_row(model, n, 1.0) for n in (1, 2)}
    report = {}
    for n in (1, 2):
        d_plain = (plain[n][0] - teacher).abs().mean().item()
        d_lcm = (distilled[n][0] - teacher).abs().mean().item()
        report[n] = {"base_diff": d_plain, "lcm_lora_diff": d_lcm, "lcm_lora_accuracy": distilled[n][1]}
        assert d_lcm <= (0.6 if n == 1 else 0.85) * d_plain, report
        assert distilled[n][1] >= (0.9 if n == 1 else 0.95), report
    print(json.dumps(report))


@pytest.mark.slow
def test_experiment_exports_adapters_the_lora_path_loads(tmp_path):
    from tests.helpers import run_main_py

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "run"
    res = run_main_py(["experiment=lcm_lora_digits", f"hydra.run.dir={run}", "progress_refresh=0",
                       "trainer.max_steps=2", "data.batch_size=8", "model.params.rank=4"], cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = run / "export" / "lcm-lora.safetensors"
    model = load_model(*resolve_model(None, None))
    load_lora(model, exported)
    from ldm.checkpoint import checkpoint_metadata

    meta = checkpoint_metadata(exported)
    assert meta.get("ldm_lcm_guidance_scale") == "3" and meta.get("ss_network_dim") == "4"
