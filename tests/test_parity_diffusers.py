"""Our UNet and VAE against diffusers (an independent implementation), same random weights.

Weights are converted with diffusers' own single-file (CompVis -> diffusers) utilities. Every
parameter is re-drawn at a normal scale (no zero-initialised output layers), so a wrong
wiring shows up as an O(1) difference rather than hiding behind zeros.
"""
import copy

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from tests.helpers import randomize_, rel_err

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)

UNET_SD1 = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                transformer_depth=1, context_dim=24, use_checkpoint=False, legacy=False)
UNET_SD2 = {k: v for k, v in UNET_SD1.items() if k != "num_heads"}
UNET_SD2.update(num_head_channels=16, use_linear_in_transformer=True, attention_resolutions=[1])
UNET_INPAINT = dict(UNET_SD1, in_channels=9)


def original_config(unet_params: dict) -> dict:
    return {"model": {"params": {
        "unet_config": {"params": copy.deepcopy(unet_params)},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": copy.deepcopy(VAE_DDCONFIG)}},
    }}}


@pytest.mark.parametrize("size", [16, 9], ids=["16x16", "odd-9x9"])
@pytest.mark.parametrize("params", [UNET_SD1, UNET_SD2, UNET_INPAINT], ids=["sd1", "sd2-linear-headchannels", "inpaint-9ch"])
def test_unet_matches_diffusers(params, size):
    torch.manual_seed(0)
    ours = UNetModel(**params).eval()
    randomize_(ours, seed=1)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    cfg = single_file.create_unet_diffusers_config_from_ldm(original_config(params), ckpt)
    ref = UNet2DConditionModel(**cfg).eval()
    ref.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, cfg), strict=True)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, params["in_channels"], size, size, generator=g)
    t = torch.tensor([999, 17])
    ctx = torch.randn(2, 5, params["context_dim"], generator=g)
    with torch.no_grad():
        out = ours(x, t, context=ctx)
        expected = ref(x, t, encoder_hidden_states=ctx).sample
    assert out.std() > 0.1, "activations collapsed; the comparison would be meaningless"
    print("unet rel err", rel_err(out, expected))
    assert rel_err(out, expected) < 2e-5


def test_vae_matches_diffusers():
    torch.manual_seed(0)
    ours = AutoencoderKL(ddconfig=VAE_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()
    randomize_(ours, seed=3)
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    cfg = single_file.create_vae_diffusers_config_from_ldm(original_config(UNET_SD1), ckpt, scaling_factor=0.18215)
    ref = DiffusersVAE(**cfg).eval()
    ref.load_state_dict(single_file.convert_ldm_vae_checkpoint(ckpt, cfg), strict=True)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert rel_err(post.mean, ref_post.mean) < 2e-5
        assert rel_err(post.std, ref_post.std) < 2e-5
        z = post.mean
        dec, ref_dec = ours.decode(z), ref.decode(z).sample
    assert dec.std() > 0.1
    print("vae rel err", rel_err(dec, ref_dec))
    assert rel_err(dec, ref_dec) < 2e-5
