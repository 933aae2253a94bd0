"""First-stage training: LPIPSWithDiscriminator's math, AutoencoderKL's two-optimizer steps, offline LPIPS."""
import importlib.util
import json
import math
import os
import urllib.request
import warnings
from pathlib import Path

import pytorch_lightning as pl
import pytest
import torch
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.losses import LPIPSWithDiscriminator

ROOT = Path(__file__).resolve().parents[1]
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
REAL = torch.tensor([2.0, 0.5, -1.0, 0.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5, -0.5])


def loss_params(**overrides) -> dict:
    return {"disc_start": 0, "kl_weight": 1e-6, "disc_num_layers": 2, "disc_ndf": 8, "perceptual_weight": 0.0,
            **overrides}


def tiny_autoencoder(learn_logvar: bool = False, **overrides) -> AutoencoderKL:
    lossconfig = {"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": loss_params(**overrides)}
    return AutoencoderKL(DDCONFIG, lossconfig, embed_dim=4, learn_logvar=learn_logvar)


def digit_images(n: int) -> torch.Tensor:
    from ldm.data.digits import DigitsDataset

    ds = DigitsDataset(split="train", size=16)
    return torch.stack([ds[i]["image"] for i in range(n)]).permute(0, 3, 1, 2).contiguous()


class FirstChannel(nn.Module):
    """A stand-in discriminator whose logits are the images' first channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def as_images(logits: torch.Tensor) -> torch.Tensor:
    return logits.view(-1, 1, 1, 1).expand(-1, 3, 1, 1)


@pytest.mark.parametrize("name,expected", [
    # hinge: relu(1 - real) = [0, .5, 2, 1], relu(1 + fake) = [0, 1, 2.5, .5]
    ("hinge", 0.5 * (3.5 / 4 + 4.0 / 4)),
    ("vanilla", 0.5 * (sum(math.log1p(math.exp(-r)) for r in REAL.tolist()) / 4
                       + sum(math.log1p(math.exp(f)) for f in FAKE.tolist()) / 4)),
])
def test_discriminator_loss_closed_forms(name, expected):
    loss = LPIPSWithDiscriminator(**loss_params(disc_loss=name, disc_start=5))
    loss.discriminator = FirstChannel()
    out = loss.discriminator_loss(as_images(REAL), as_images(FAKE), global_step=5)
    assert out["disc_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["logits_real"].item() == pytest.approx(REAL.mean().item())
    assert out["logits_fake"].item() == pytest.approx(FAKE.mean().item())
    # Before disc_start the discriminator loss is switched off.
    assert loss.discriminator_loss(as_images(REAL), as_images(FAKE), global_step=4)["disc_loss"].item() == 0.0


def test_unknown_disc_loss_is_refused():
    with pytest.raises(ValueError, match="hinge, vanilla"):
        LPIPSWithDiscriminator(**loss_params(disc_loss="wasserstein"))


def test_published_compvis_lossconfig_builds_with_compvis_keys():
    from ldm.util import instantiate_from_config

    node = {"target": "ldm.modules.losses.LPIPSWithDiscriminator",  # CompVis kl-f8 config.yaml, as published
            "params": {"disc_start": 50001, "kl_weight": 1.0e-06, "disc_weight": 0.5}}
    with pytest.warns(UserWarning, match="perceptual"):
        loss = instantiate_from_config(node)
    shapes = {k: tuple(v.shape) for k, v in loss.state_dict().items() if not k.endswith("num_batches_tracked")}
    convs = {0: (64, 3), 2: (128, 64), 5: (256, 128), 8: (512, 256), 11: (1, 512)}
    expected = {f"discriminator.main.{i}.weight": (o, c, 4, 4) for i, (o, c) in convs.items()}
    expected.update({f"discriminator.main.{i}.bias": (o,) for i, (o, _) in convs.items() if i in (0, 11)})
    for i, width in ((3, 128), (6, 256), (9, 512)):
        expected.update({f"discriminator.main.{i}.{n}": (width,)
                         for n in ("weight", "bias", "running_mean", "running_var")})
    assert shapes == {"logvar": (), **expected}
    assert (loss.disc_factor_at(50000), loss.disc_factor_at(50001)) == (0.0, 1.0)


def test_disc_factor_switches_on_at_disc_start():
    loss = LPIPSWithDiscriminator(**loss_params(disc_start=10))
    assert [loss.disc_factor_at(s) for s in (0, 9, 10, 11, 10_000)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    scaled = LPIPSWithDiscriminator(**loss_params(disc_start=3, disc_factor=0.25))
    assert [scaled.disc_factor_at(s) for s in (2, 3)] == [0.0, 0.25]


def test_generator_loss_and_adaptive_weight_match_independent_computation():
    torch.manual_seed(0)
    model = tiny_autoencoder(disc_start=3, disc_weight=0.5, kl_weight=1e-3, logvar_init=0.3)
    x = digit_images(4)
    rec, posterior = model(x)
    last = model.get_last_layer()
    out = model.loss.generator_loss(x, rec, posterior, global_step=3, last_layer=last)

    logvar = 0.3
    nll = ((x - rec).abs() / math.exp(logvar) + logvar).sum() / 4
    g = -model.loss.discriminator(rec).mean()
    (nll_grad,) = torch.autograd.grad(nll, last, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g, last, retain_graph=True)
    d_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    kl = posterior.kl().sum() / 4
    assert out["d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert out["nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert out["g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((nll + 1e-3 * kl + d_weight * g).item(), rel=1e-5)
    # The CompVis call signature gives the same numbers, with "<split>/" log keys.
    total, log = model.loss(x, rec, posterior, 0, 3, last_layer=last, split="train")
    assert total.item() == pytest.approx(out["loss"].item(), rel=1e-5)
    assert log["train/total_loss"].item() == pytest.approx(total.item()) and "train/d_weight" in log
    _, log = model.loss(x, rec, posterior, 1, 3, split="val")
    assert set(log) == {"val/disc_loss", "val/logits_real", "val/logits_fake", "val/disc_factor"}

    # Before disc_start: no adversarial term; without gradients (validation): d_weight 0.
    early = model.loss.generator_loss(x, rec, posterior, global_step=2, last_layer=last)
    assert early["disc_factor"].item() == 0.0 and early["d_weight"].item() == 0.0
    assert early["loss"].item() == pytest.approx((nll + 1e-3 * kl).item(), rel=1e-5)
    with torch.no_grad():
        val = model.loss.generator_loss(x, rec.detach(), posterior, global_step=3, last_layer=last)
    assert val["d_weight"].item() == 0.0
    assert val["loss"].item() == pytest.approx((nll + 1e-3 * kl).item(), rel=1e-5)


def test_logvar_is_fixed_unless_learned():
    fixed = tiny_autoencoder()
    assert not fixed.loss.logvar.requires_grad
    assert all(p is not fixed.loss.logvar for p in fixed.configure_optimizers()[0].param_groups[0]["params"])
    learned = tiny_autoencoder(learn_logvar=True)
    opt_ae, opt_disc = learned.configure_optimizers()
    assert any(p is learned.loss.logvar for p in opt_ae.param_groups[0]["params"])
    assert opt_ae.defaults["betas"] == opt_disc.defaults["betas"] == (0.5, 0.9)


@pytest.mark.slow
def test_manual_optimization_trains_autoencoder_and_discriminator():
    torch.manual_seed(0)
    model = tiny_autoencoder(disc_start=0, disc_weight=0.5)
    assert not model.automatic_optimization
    model.learning_rate = 1e-3
    x = digit_images(16)
    ae_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("loss.")}
    disc_before = {k: v.clone() for k, v in model.loss.discriminator.state_dict().items()}

    def rec_error() -> float:
        with torch.no_grad():
            return (model.eval()(x, sample_posterior=False)[0] - x).abs().mean().item()

    before = rec_error()
    batches = 25
    loader = torch.utils.data.DataLoader([{"image": img} for img in x] * batches, batch_size=16)
    trainer = pl.Trainer(max_steps=2 * batches, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(model.train(), loader)
    after = rec_error()

    assert trainer.global_step == 2 * batches  # one autoencoder and one discriminator step per batch
    assert model.loss_step == batches
    assert after < 0.8 * before, (before, after)
    ae_after = model.state_dict()
    for key in ("encoder.conv_in.weight", "decoder.conv_out.weight"):
        assert not torch.equal(ae_before[key], ae_after[key]), key
    disc_after = model.loss.discriminator.state_dict()
    assert not torch.equal(disc_before["main.0.weight"], disc_after["main.0.weight"])
    assert model.loss.logvar.item() == 0.0  # CompVis: not trained unless learn_logvar
    metrics = trainer.callback_metrics
    assert metrics["train/d_weight"] > 0 and metrics["train/disc_factor"] == 1.0
    assert {"train/disc_loss", "train/g_loss", "train/rec_loss", "train/loss", "train/kl_loss"} <= set(metrics)


# ---- perceptual term --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A randomly initialised torchvision VGG16, saved in the layout of vgg16-397923af.pth (features only)."""
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features.state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    return path


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_perceptual_term_from_user_weights(vgg_file, no_downloads):
    loss = LPIPSWithDiscriminator(**loss_params(perceptual_weight=1.0, perceptual_weights=str(vgg_file)))
    lpips = loss.perceptual_loss
    assert lpips is not None and loss.perceptual_weight == 1.0
    # CompVis key layout, weights from the user's file and from the lpips package.
    saved = torch.load(vgg_file, map_location="cpu", weights_only=True)
    assert torch.equal(lpips.state_dict()["net.slice5.28.weight"], saved["features.28.weight"])
    package_dir = Path(list(importlib.util.find_spec("lpips").submodule_search_locations)[0])
    shipped = torch.load(package_dir / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    assert torch.equal(lpips.lin3.model[1].weight, shipped["lin3.model.1.weight"])
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision indices, five slices
    slice_of = {i: 1 + sum(i >= start for start in (4, 9, 16, 23)) for i in convs}
    expected = {f"perceptual_loss.net.slice{slice_of[i]}.{i}.{p}" for i in convs for p in ("weight", "bias")}
    expected |= {f"perceptual_loss.lin{i}.model.1.weight" for i in range(5)}
    expected |= {"perceptual_loss.scaling_layer.shift", "perceptual_loss.scaling_layer.scale"}
    assert {k for k in loss.state_dict() if k.startswith("perceptual_loss.")} == expected

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_()
    d = lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert lpips(x, x).abs().max().item() < 1e-6
    d.sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())  # the metric itself stays frozen
    loss.train()
    assert not lpips.training

    # In the generator loss the perceptual distance is added to every pixel's L1 error.
    rec = y.detach().requires_grad_()
    posterior = tiny_autoencoder().encode(x)
    out = loss.generator_loss(x, rec, posterior, global_step=0)
    p = lpips(x, rec).detach()
    assert out["p_loss"].item() == pytest.approx(p.mean().item(), rel=1e-5)
    assert out["rec_loss"].item() == pytest.approx(((x - rec).abs() + p).mean().item(), rel=1e-5)
    out["loss"].backward()
    assert rec.grad is not None


def test_perceptual_term_is_off_with_a_warning_without_weights():
    with pytest.warns(UserWarning, match="perceptual_weights") as caught:
        loss = LPIPSWithDiscriminator(**loss_params(perceptual_weight=1.0))
    assert len(caught) == 1 and "vgg16-397923af.pth" in str(caught[0].message)
    assert loss.perceptual_loss is None and loss.perceptual_weight == 0.0
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LPIPSWithDiscriminator(**loss_params(perceptual_weight=0.0))  # asked for no perceptual term: silent


def test_bad_perceptual_weights_file_is_one_clear_error(tmp_path):
    missing = tmp_path / "nope" / "vgg16.pth"
    with pytest.raises(CheckpointError, match="perceptual_weights") as err:
        LPIPSWithDiscriminator(**loss_params(perceptual_weight=1.0, perceptual_weights=str(missing)))
    assert str(missing) in str(err.value) and "vgg16-397923af.pth" in str(err.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 4)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        LPIPSWithDiscriminator(**loss_params(perceptual_weight=1.0, perceptual_weights=str(garbage)))

    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, other)
    with pytest.raises(CheckpointError, match="not torchvision's VGG16"):
        LPIPSWithDiscriminator(**loss_params(perceptual_weight=1.0, perceptual_weights=str(other)))


def test_discriminator_refuses_images_too_small_for_its_depth():
    loss = LPIPSWithDiscriminator(**loss_params(disc_num_layers=3))
    with pytest.raises(ValueError, match="lower disc_num_layers"):
        loss.discriminator(torch.zeros(1, 3, 16, 16))


# ---- end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_gan_experiment_trains_through_main_and_exports(tmp_path):
    run = tmp_path / "run"
    from tests.helpers import run_main_py

    args = ["experiment=digits_autoencoder_gan", f"hydra.run.dir={run}", "loggers=[csv]", "progress_refresh=0",
            "trainer.max_steps=6", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1", "data.batch_size=8",
            "model.params.lossconfig.params.disc_start=1"]
    res = run_main_py(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-3000:]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6  # 3 batches, two optimizer steps each
    assert "val/loss" in metrics and "val/rec_loss" in metrics and "val/disc_loss" in metrics
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/g_loss", "train/disc_loss", "train/d_weight"} <= set(header)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["optimizer_states"]) == 2
    assert any(k.startswith("loss.discriminator.") for k in ckpt["state_dict"])

    # The export loads strictly with its own config, and as a LatentDiffusion first stage
    # (lossconfig torch.nn.Identity), whose loader leaves the loss.* keys out.
    from ldm.api import load_model

    export = run / "export"
    model = load_model(export / "config.yaml", export / "model.safetensors")
    x = digit_images(2)
    with torch.no_grad():
        assert model(x, sample_posterior=False)[0].shape == x.shape
    first_stage = AutoencoderKL(DDCONFIG, {"target": "torch.nn.Identity"}, embed_dim=4,
                                ckpt_path=str(export / "model.safetensors"))
    assert torch.equal(first_stage.encoder.conv_in.weight, model.encoder.conv_in.weight)
