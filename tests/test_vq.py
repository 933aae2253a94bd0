"""The VQ first stage (CompVis ``VQModel`` / ``VQModelInterface``, taming's ``VectorQuantizer2``) and VQ latent diffusion."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.models.autoencoder import IdentityFirstStage, VQModel, VQModelInterface
from ldm.modules.vqvae.quantize import VectorQuantizer, VectorQuantizer2
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
DDCONFIG = {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
IDENTITY = {"target": "torch.nn.Identity"}
GAN_LOSS = {"target": "ldm.modules.losses.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 0, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8,
                       "codebook_weight": 1.0, "n_classes": 16}}


def vq_model(cls=VQModel, lossconfig=IDENTITY, seed: int = 0, **params) -> VQModel:
    torch.manual_seed(seed)
    return cls(ddconfig=DDCONFIG, lossconfig=lossconfig, n_embed=16, embed_dim=3, **params)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- (a) the quantizer
def direct_quantization(z: torch.Tensor, codebook: torch.Tensor):
    """Nearest codes, z_q and the code histogram's perplexity, computed plainly (cdist + argmin, numpy)."""
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    idx = torch.cdist(flat.double(), codebook.detach().double()).argmin(dim=1)
    z_q = codebook.detach()[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    counts = np.bincount(idx.numpy(), minlength=codebook.shape[0])
    p = counts[counts > 0] / counts.sum()
    return idx, z_q, math.exp(-(p * np.log(p)).sum())


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_codes_loss_and_gradients_match_a_direct_computation(legacy):
    torch.manual_seed(0)
    beta = 0.25
    q = VectorQuantizer2(n_e=12, e_dim=3, beta=beta, legacy=legacy)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, loss, (perplexity, min_encodings, indices) = q(z)
    idx, want_zq, want_perplexity = direct_quantization(z, q.embedding.weight)

    assert torch.equal(indices, idx) and indices.shape == (2 * 4 * 5,)
    assert torch.allclose(z_q, want_zq.float(), atol=1e-6)
    assert min_encodings is None and abs(perplexity.item() - want_perplexity) < 1e-4
    mse = ((want_zq - z.detach().double()) ** 2).mean().item()
    assert abs(loss.item() - (1 + beta) * mse) < 1e-6  # both terms have the value mse; beta weights one of them

    # Gradients tell the terms apart: legacy puts beta on the codebook term, the paper on the commitment term.
    loss.backward()
    n = z.numel()
    w_commit, w_codebook = (1.0, beta) if legacy else (beta, 1.0)
    diff = (want_zq - z.detach().double()).float()
    assert torch.allclose(z.grad, -2 * w_commit * diff / n, atol=1e-7)
    per_position = (2 * w_codebook * diff / n).permute(0, 2, 3, 1).reshape(-1, 3)
    want_codebook_grad = torch.zeros(12, 3).index_add_(0, idx, per_position)
    assert torch.allclose(q.embedding.weight.grad, want_codebook_grad, atol=1e-7)


def test_straight_through_gradient_and_codebook_lookup():
    torch.manual_seed(1)
    q = VectorQuantizer(n_e=8, e_dim=4, beta=0.25, sane_index_shape=True)
    assert VectorQuantizer is VectorQuantizer2 and list(q.state_dict()) == ["embedding.weight"]
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, (_, _, indices) = q(z)
    z_q.retain_grad()
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, z_q.grad) and torch.equal(z.grad, upstream)  # identity gradient through the codes
    assert q.embedding.weight.grad is None  # the output's gradient does not reach the codebook
    assert indices.shape == (2, 3, 3)
    # z + (z_q - z) rounds: the output equals the codebook rows up to float error.
    assert torch.allclose(q.get_codebook_entry(indices.reshape(-1), (2, 3, 3, 4)), z_q.detach(), atol=1e-6)


def test_quantizer_remap_reads_plain_npy_only(tmp_path):
    torch.manual_seed(2)
    q = VectorQuantizer2(8, 2, 0.25)
    used = np.array([5, 1, 3], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    remapped = VectorQuantizer2(8, 2, 0.25, remap=str(tmp_path / "used.npy"), unknown_index="extra")
    remapped.load_state_dict(q.state_dict(), strict=False)
    assert sorted(remapped.state_dict()) == ["embedding.weight", "used"]
    z = torch.randn(1, 2, 4, 4)
    _, _, (_, _, plain) = q(z)
    _, _, (_, _, mapped) = remapped(z)
    position = {5: 0, 1: 1, 3: 2}
    assert mapped.shape == (16, 1)
    assert mapped.reshape(-1).tolist() == [position.get(int(i), 3) for i in plain]  # 3: the "extra" index
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="plain .npy integer array"):
        VectorQuantizer2(8, 2, 0.25, remap=str(tmp_path / "objects.npy"))
    np.save(tmp_path / "too_big.npy", np.array([9]))
    with pytest.raises(ValueError, match="outside"):
        VectorQuantizer2(8, 2, 0.25, remap=str(tmp_path / "too_big.npy"))


# ---------------------------------------------------------------- (b) VQModel shapes and keys
def resnet_keys(prefix: str, shortcut: bool = False) -> set[str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return {f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")}


def attention_keys(prefix: str) -> set[str]:
    return {f"{prefix}.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")}


def pair(*prefixes: str) -> set[str]:
    return {f"{p}.{s}" for p in prefixes for s in ("weight", "bias")}


def compvis_vq_keys() -> set[str]:
    """CompVis' VQModel state dict for DDCONFIG (ch 32, ch_mult [1, 2], one res block, no attention), by hand."""
    def mid(net: str) -> set[str]:
        return resnet_keys(f"{net}.mid.block_1") | attention_keys(f"{net}.mid.attn_1") | resnet_keys(f"{net}.mid.block_2")

    encoder = (pair("encoder.conv_in", "encoder.down.0.downsample.conv", "encoder.norm_out", "encoder.conv_out")
               | resnet_keys("encoder.down.0.block.0") | resnet_keys("encoder.down.1.block.0", shortcut=True)
               | mid("encoder"))
    decoder = (pair("decoder.conv_in", "decoder.up.1.upsample.conv", "decoder.norm_out", "decoder.conv_out")
               | resnet_keys("decoder.up.1.block.0") | resnet_keys("decoder.up.1.block.1")
               | resnet_keys("decoder.up.0.block.0", shortcut=True) | resnet_keys("decoder.up.0.block.1")
               | mid("decoder"))
    return encoder | decoder | pair("quant_conv", "post_quant_conv") | {"quantize.embedding.weight"}


def test_vq_model_keys_shapes_and_codes():
    model = vq_model().eval()
    state = model.state_dict()
    assert set(state) == compvis_vq_keys()
    assert state["quantize.embedding.weight"].shape == (16, 3) and state["quant_conv.weight"].shape == (3, 3, 1, 1)
    x = images(2, 0)
    quant, emb_loss, (perplexity, _, indices) = model.encode(x)
    assert quant.shape == (2, 3, 8, 8) and emb_loss.dim() == 0 and indices.shape == (2 * 8 * 8,)
    assert 1.0 <= perplexity.item() <= 16.0
    assert torch.allclose(quant, model.quantize.get_codebook_entry(indices, (2, 8, 8, 3)), atol=1e-6)
    rec, diff, ind = model(x, return_pred_indices=True)
    assert rec.shape == x.shape and torch.equal(ind, indices) and torch.equal(diff, emb_loss)
    assert torch.allclose(model.decode_code(indices.reshape(2, 8, 8)), rec, atol=1e-5)
    assert model.downsample_factor == 2
    # A CompVis-layout checkpoint loads back through ckpt_path (ignore_keys drops entries, as CompVis).
    with_gan = vq_model(lossconfig=GAN_LOSS, use_ema=True)
    keys = set(with_gan.state_dict())
    assert {k for k in keys if not k.startswith(("loss.", "model_ema."))} == compvis_vq_keys()
    assert "loss.discriminator.main.0.weight" in keys and "model_ema.quantizeembeddingweight" in keys
    with pytest.raises(ValueError, match="double_z: false"):
        VQModel(ddconfig={**DDCONFIG, "double_z": True}, lossconfig=IDENTITY, n_embed=16, embed_dim=3)


def test_vq_model_builds_from_a_compvis_config_and_loads_its_checkpoint(tmp_path):
    from ldm.checkpoint import save_state_dict

    source = vq_model(seed=3)
    save_state_dict({**source.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(1)},
                    tmp_path / "vq.safetensors")
    config = {"target": "ldm.models.autoencoder.VQModelInterface",
              "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": DDCONFIG, "lossconfig": IDENTITY,
                         "ckpt_path": str(tmp_path / "vq.safetensors"), "ignore_keys": ["loss."]}}
    loaded = instantiate_from_config(config)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="n_embedding"):
        instantiate_from_config({**config, "params": {**config["params"], "n_embedding": 8}})
    # CompVis' first-stage YAMLs (models/first_stage_models/vq-*/config.yaml) name taming's loss.
    taming_loss = {**GAN_LOSS, "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}
    gan = instantiate_from_config({"target": "ldm.models.autoencoder.VQModel",
                                   "params": {**config["params"], "lossconfig": taming_loss}})
    assert type(gan.loss).__name__ == "VQLPIPSWithDiscriminator" and gan.has_discriminator


# ---------------------------------------------------------------- (c) VQModelInterface and the LDM decode path
def test_interface_decode_quantizes_unless_forced():
    model = vq_model(VQModelInterface).eval()
    x = images(1, 1)
    h = model.encode(x)
    assert torch.equal(h, model.encode_to_prequant(x)) and h.shape == (1, 3, 8, 8)
    quantized = model.decoder(model.post_quant_conv(model.quantize(h)[0]))
    raw = model.decoder(model.post_quant_conv(h))
    assert torch.equal(model.decode(h), quantized)
    assert torch.equal(model.decode(h, force_not_quantize=True), raw)
    assert not torch.allclose(quantized, raw)


def test_identity_first_stage_matches_compvis_and_warns_once(monkeypatch):
    monkeypatch.setattr(IdentityFirstStage, "_warned", False)
    x = torch.randn(1, 3, 4, 4)
    plain = IdentityFirstStage()
    assert plain.encode(x) is x and plain.decode(x) is x and plain.quantize(x) is x and plain(x) is x
    vq = IdentityFirstStage(vq_interface=True)
    assert vq.quantize(x)[0] is x and vq.quantize(x)[1:] == (None, [None, None, None])
    with pytest.warns(UserWarning, match="ignores 'vq_interfce'"):
        IdentityFirstStage(vq_interfce=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IdentityFirstStage(embed_dim=4)  # once per process


@pytest.fixture(scope="module")
def tiny_vq_ldm():
    from ldm.api import build_model

    torch.manual_seed(0)
    return build_model(ROOT / "configs/tiny/tiny-ldm-vq.yaml")


def test_latent_diffusion_encodes_and_decodes_through_the_vq_stage(tiny_vq_ldm):
    model = tiny_vq_ldm.eval()
    fs = model.first_stage_model
    assert isinstance(fs, VQModelInterface) and model.cond_stage_model is None and model.model.conditioning_key is None
    x = images(2, 2)
    h = model.encode_first_stage(x)
    assert torch.equal(model.get_first_stage_encoding(h), model.scale_factor * h)
    z = model.get_first_stage_encoding(h)
    assert torch.equal(model.decode_first_stage(z), fs.decode(z / model.scale_factor))
    assert torch.equal(model.decode_first_stage(z, force_not_quantize=True), fs.decoder(fs.post_quant_conv(h)))
    codes = fs.quantize(h)[2][2].reshape(2, 8, 8)
    assert torch.allclose(model.decode_first_stage(codes, predict_cids=True), fs.decode(fs.quantize(h)[0], True), atol=1e-5)


# ---------------------------------------------------------------- (d) VQ latent diffusion trains and samples
class ImageBatches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        # CompVis datasets give [H, W, C] images; class-conditional ones an integer class_label.
        return {"image": images(1, 100 + i)[0].permute(1, 2, 0), "class_label": i % 4}


def fit(model: pl.LightningModule, max_steps: int, batch_size: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         log_every_n_steps=1)
    trainer.fit(model, torch.utils.data.DataLoader(ImageBatches(), batch_size=batch_size))
    return trainer


def class_conditional_vq_ldm():
    """The tiny config made class-conditional like CompVis' cin-ldm-vq-f8.yaml (trainable ClassEmbedder, cross-attention)."""
    from omegaconf import OmegaConf

    from ldm.api import build_model

    cfg = OmegaConf.load(ROOT / "configs/tiny/tiny-ldm-vq.yaml")
    params = cfg.model.params
    params.update(cond_stage_key="class_label", cond_stage_trainable=True, conditioning_key="crossattn")
    params.unet_config.params.update(use_spatial_transformer=True, transformer_depth=1, context_dim=16)
    params.cond_stage_config = {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                "params": {"embed_dim": 16, "n_classes": 5, "key": "class_label"}}
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("kind", ["unconditional", "class-conditional"])
def test_tiny_vq_latent_diffusion_trains_with_lightning(tiny_vq_ldm, kind):
    model = tiny_vq_ldm if kind == "unconditional" else class_conditional_vq_ldm()
    model.train()  # Lightning keeps the mode a module starts fit in
    model.learning_rate = 1e-3
    unet = {k: v.clone() for k, v in model.model.state_dict().items()}
    first = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    cond = {k: v.clone() for k, v in model.cond_stage_model.state_dict().items()} if model.cond_stage_model else {}
    trainer = fit(model, max_steps=3)
    assert trainer.global_step == 3
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert any(not torch.equal(v, model.model.state_dict()[k]) for k, v in unet.items())
    assert all(torch.equal(v, model.first_stage_model.state_dict()[k]) for k, v in first.items())  # frozen
    if kind == "class-conditional":  # the class embedding trains with the UNet (cond_stage_trainable)
        assert not torch.equal(cond["embedding.weight"], model.cond_stage_model.embedding.weight)
        from ldm.generation import generate

        with pytest.raises(ValueError, match="class-conditional"):
            generate(model.eval(), ["a cat"], seeds=[1], steps=2, height=16, width=16, progress=False)


def test_tiny_vq_latent_diffusion_samples_through_generate(tiny_vq_ldm):
    from ldm.generation import generate

    model = tiny_vq_ldm.eval()
    out = generate(model, [""], seeds=[1], steps=2, height=16, width=16, sampler="ddim", progress=False)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    out = generate(model, [""], seeds=[1], steps=2, height=16, width=16, sampler="ddim", progress=False,
                   init_image=images(1, 3), strength=0.5)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()


# ---------------------------------------------------------------- (e) VQModel's own adversarial training
def test_vq_model_training_steps_both_optimizers():
    model = vq_model(lossconfig=GAN_LOSS, seed=4)
    model.learning_rate = 1e-3
    assert not model.automatic_optimization
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fit(model, max_steps=4)  # two batches: an autoencoder and a discriminator step each
    assert trainer.global_step == 4 and model.loss_step == 2
    changed = {k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])}
    assert "quantize.embedding.weight" in changed and "encoder.conv_in.weight" in changed
    assert "decoder.conv_out.weight" in changed and "loss.discriminator.main.0.weight" in changed
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/disc_loss", "train/quant_loss", "train/perplexity"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/disc_factor"]) == 1.0


def test_vq_generator_loss_value():
    from ldm.modules.losses import VQLPIPSWithDiscriminator

    loss = VQLPIPSWithDiscriminator(disc_start=10, codebook_weight=0.5, perceptual_weight=0.0, disc_num_layers=2,
                                    disc_ndf=8, pixel_loss="l2")
    x, r = images(2, 5), images(2, 6)
    q = torch.tensor(0.3)
    value, log = loss(q, x, r, optimizer_idx=0, global_step=0, split="val")
    assert torch.allclose(value, F.mse_loss(r, x) + 0.5 * q)  # before disc_start: no adversarial term
    assert float(log["val/disc_factor"]) == 0.0 and torch.allclose(log["val/quant_loss"], q)
