"""SD 2's depth-to-image model: the official layout, MiDaS DPT-Hybrid against timm and transformers, the depth
conditioning against diffusers' preprocessing, the UNet and the whole StableDiffusionDepth2ImgPipeline against
diffusers, where MiDaS weights come from, and scripts/depth2img.py end to end."""
import importlib.util
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from ldm.api import OPTIONAL_KEYS, build_model, guess_architecture, load_model, save_model
from ldm.checkpoint import check_state_dict, read_state_dict, save_state_dict
from ldm.depth2img import depth2img, read_depth_map, with_midas_weights
from ldm.image_io import image_to_tensor, read_metadata
from ldm.models.diffusion.ddpm import LatentDepth2ImageDiffusion
from ldm.modules.midas.api import MiDaSInference, midas_input_size
from tests.helpers import numel, randomize_, rel_err
from tests.test_manifests import build_on_meta, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = "v2-midas-inference.yaml"
TINY = ROOT / "configs/tiny/tiny-sd2-depth.yaml"
# (UNet, VAE, OpenCLIP text encoder, MiDaS DPT-Hybrid, total) parameters of 512-depth-ema (tests/reference/README.md).
COUNTS = (865_913_604, 83_653_863, 354_032_641, 123_146_985, 1_426_747_093)


@pytest.fixture(scope="module")
def tiny() -> LatentDepth2ImageDiffusion:
    """The tiny depth model with every weight re-drawn (no zero-initialised output layer); the depth head's last
    bias is lifted so its ReLU output is a map, not mostly zeros."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    randomize_(model.model.diffusion_model, seed=1)
    randomize_(model.first_stage_model, seed=2)
    randomize_(model.depth_model, seed=3)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
        model.depth_model.model.scratch.output_conv[4].bias.fill_(2.0)
    return model


def _image(seed: int, h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- the official layout ------------------------------------------------------------------------------------
def test_official_config_builds_the_published_layout(reference_dir):
    model = build_on_meta(OFFICIAL, {})
    assert isinstance(model, LatentDepth2ImageDiffusion) and model.model.conditioning_key == "hybrid"
    expected = read_manifest(reference_dir / "sd-v2-depth.tsv")
    got = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()}
    assert sorted(set(expected) ^ set(got)) == []
    assert {k: v for k, v in got.items() if v != expected[k]} == {}
    assert (numel(model.model.diffusion_model), numel(model.first_stage_model), numel(model.cond_stage_model),
            numel(model.depth_model), numel(model)) == COUNTS
    depth_keys = [k for k in got if k.startswith("depth_model.")]
    assert len(depth_keys) == 368 and all(k.startswith("depth_model.model.pretrained.") or
                                          k.startswith("depth_model.model.scratch.") for k in depth_keys)
    assert got["model.diffusion_model.input_blocks.0.0.weight"][0] == (320, 5, 3, 3)
    assert model.depth_model.net_size == 384 and model.parameterization == "eps"
    # What the loader does with a file of this layout (meta tensors: no memory): strict check, named architecture.
    check_state_dict(model, {k: torch.empty(s, device="meta") for k, (s, _) in expected.items()}, strict=True,
                     optional_keys=OPTIONAL_KEYS)
    assert guess_architecture({k: s for k, (s, _) in expected.items()}) == "SD 2.x depth"


def test_only_dpt_hybrid_and_known_dpt_options():
    with pytest.raises(ValueError, match="model_type 'dpt_large' is not supported; use 'dpt_hybrid'") as err:
        MiDaSInference("dpt_large")
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match="dpt_config has no option 'featurs'"):
        MiDaSInference(dpt_config={"featurs": 16})


# ---- MiDaS DPT-Hybrid against independent implementations ------------------------------------------------
def test_hybrid_vit_matches_timm(tiny):
    """timm's R50+ViT hybrid (the architecture MiDaS built its backbone from), shrunk alike, takes our weights by
    name, strictly, and gives the same stage features and hooked tokens."""
    timm = pytest.importorskip("timm")
    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    ours = tiny.depth_model.model.pretrained.model
    backbone = ResNetV2(layers=(1, 1, 1), channels=(16, 32, 64), stem_chs=8, num_classes=0, global_pool="",
                        preact=False, stem_type="same", conv_layer=partial(StdConv2dSame, eps=1e-8),
                        norm_layer=partial(GroupNormAct, num_groups=4))
    vit = VisionTransformer(img_size=64, patch_size=1, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                            embed_layer=partial(HybridEmbed, backbone=backbone)).eval()
    vit.load_state_dict(ours.state_dict(), strict=True)
    seen = {}
    for i in (0, 1):
        vit.patch_embed.backbone.stages[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    x = _image(0, 64, 64)
    with torch.no_grad():
        tokens = vit.forward_intermediates(x, indices=[0, 1], return_prefix_tokens=True, norm=False,
                                           output_fmt="NLC", intermediates_only=True)
        got = ours(x)
    expected = [seen[0], seen[1]] + [torch.cat([prefix, grid], dim=1) for grid, prefix in tokens]
    for a, b in zip(got, expected):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, (a.shape, rel_err(a, b))
    print(f"timm hybrid ViT: timm {timm.__version__}, max rel err {max(rel_err(a, b) for a, b in zip(got, expected)):.1e}")


# Our (MiDaS) DPT-Hybrid key -> transformers' DPTForDepthEstimation key: (pattern, replacement), first match wins.
TRANSFORMERS_NAMES = [
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.", "dpt.embeddings.backbone.bit.embedder.convolution."),
    (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.", "dpt.embeddings.backbone.bit.embedder.norm."),
    (r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.", r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers."),
    (r"pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
    (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
    (r"pretrained\.model\.norm\.", "dpt.layernorm."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
    (r"pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
    (r"pretrained\.act_postprocess([34])\.0\.project\.0\.", lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0."),
    (r"pretrained\.act_postprocess([34])\.3\.", lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection."),
    (r"pretrained\.act_postprocess4\.4\.", "neck.reassemble_stage.layers.3.resize."),
    (r"scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
    (r"scratch\.refinenet(\d)\.out_conv\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.projection."),
    (r"scratch\.refinenet(\d)\.resConfUnit(\d)\.conv(\d)\.",
     lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}.residual_layer{m[2]}.convolution{m[3]}."),
    (r"scratch\.output_conv\.", "head.head."),
]


def _to_transformers(state: dict) -> dict:
    """Our DPT-Hybrid state dict under transformers' names: qkv split in three, the ImageNet head (which
    transformers does not have, and DPT never uses) left out."""
    import re

    out = {}
    for key, value in state.items():
        if key.startswith("pretrained.model.head."):
            continue
        if m := re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[f"dpt.encoder.layer.{m[1]}.attention.attention.{name}.{m[2]}"] = part
            continue
        for pattern, replacement in TRANSFORMERS_NAMES:
            new, count = re.subn("^" + pattern, replacement, key)
            if count:
                out[new] = value
                break
        else:
            raise KeyError(f"no transformers name for {key}")
    return out


def _transformers_dpt(tiny):
    transformers = pytest.importorskip("transformers")
    config = transformers.DPTConfig(
        is_hybrid=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=64, patch_size=16, backbone_out_indices=[0, 1, 0, 1], neck_hidden_sizes=[16, 32, 32, 32],
        fusion_hidden_size=16, reassemble_factors=[1, 1, 1, 0.5], layer_norm_eps=1e-6, hidden_act="gelu",
        backbone_featmap_shape=[1, 64, 4, 4],
        backbone_config=dict(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], hidden_sizes=[16, 32, 64],
                             out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True,
                             embedding_size=8, num_groups=4))
    dpt = transformers.DPTForDepthEstimation(config).eval()
    dpt.load_state_dict(_to_transformers(tiny.depth_model.model.state_dict()), strict=True)
    return dpt, transformers


def test_depth_estimator_matches_transformers_dpt_hybrid(tiny):
    """transformers' DPTForDepthEstimation (is_hybrid=True, BiT backbone), tiny, with our weights mapped onto its
    names (all of them, strictly), predicts the same depth."""
    dpt, _ = _transformers_dpt(tiny)
    x = torch.cat([_image(1, 64, 64), _image(2, 64, 64)])
    with torch.no_grad():
        ref = dpt(pixel_values=x).predicted_depth
        ours = tiny.depth_model(x)
    assert ours.shape == (2, 1, 64, 64) and ref.shape == (2, 64, 64) and ref.std() > 0.05
    err = rel_err(ours[:, 0], ref)
    print(f"MiDaS DPT-Hybrid vs transformers DPTForDepthEstimation: rel err {err:.1e}")
    assert err < 1e-5


# ---- depth conditioning ------------------------------------------------------------------------------------------
def test_midas_input_size_is_the_minimal_resize_to_multiples_of_32():
    """MiDaS' Resize(384, 384, keep_aspect_ratio, ensure_multiple_of=32, "minimal"): the scale of the side that
    changes least, each side rounded (half to even) to a multiple of 32."""
    def reference(h: int, w: int) -> tuple[int, int]:
        sh, sw = 384 / h, 384 / w
        s = sw if abs(1 - sw) < abs(1 - sh) else sh
        return tuple(int(np.round(v * s / 32) * 32) for v in (h, w))

    for h, w in [(512, 512), (512, 768), (768, 512), (1080, 1920), (384, 400), (600, 200), (64, 64)]:
        assert midas_input_size(h, w) == reference(h, w)
    assert midas_input_size(512, 768) == (384, 576) and midas_input_size(1080, 1920) == (384, 672)
    assert midas_input_size(64, 96, net_size=64) == (64, 96)


def test_depth_conditioning_is_diffusers_prepare_depth_map(tiny):
    """Resize to the latent size (bicubic, no corner alignment) and per-image min-max to [-1, 1], as diffusers'
    prepare_depth_map computes it (written out here), for several maps at once; training adds upstream's 1e-3."""
    g = torch.Generator().manual_seed(4)
    depth = torch.rand(3, 48, 80, generator=g) * torch.tensor([1.0, 50.0, 3000.0]).view(3, 1, 1)
    latent = (12, 20)
    ref = F.interpolate(depth.unsqueeze(1), size=latent, mode="bicubic", align_corners=False)
    low, high = torch.amin(ref, dim=[1, 2, 3], keepdim=True), torch.amax(ref, dim=[1, 2, 3], keepdim=True)
    ref = 2.0 * (ref - low) / (high - low) - 1.0
    ours = LatentDepth2ImageDiffusion.depth_conditioning(depth.unsqueeze(1), latent)
    assert torch.allclose(ours, ref, atol=1e-6) and ours.amin() == -1 and ours.amax() == 1
    trained = LatentDepth2ImageDiffusion.depth_conditioning(depth.unsqueeze(1), latent, eps=1e-3)
    assert torch.all(trained.amax(dim=(1, 2, 3)) < 1)
    flat = LatentDepth2ImageDiffusion.depth_conditioning(torch.ones(1, 1, 8, 8), (4, 4))
    assert torch.equal(flat, -torch.ones(1, 1, 4, 4))  # a flat map: defined, not NaN
    # The model's own estimate at MiDaS size, then the same preprocessing; the training batch path agrees.
    image = _image(5, 64, 96)
    with torch.no_grad():
        estimate = tiny.estimate_depth(image)
        z, cond = tiny.get_input({"jpg": image.permute(0, 2, 3, 1), "txt": ["a room"]}, "jpg")
    assert estimate.shape == (1, 1, 64, 96) and estimate.std() > 0.01
    expected = LatentDepth2ImageDiffusion.depth_conditioning(estimate, z.shape[2:], eps=1e-3)
    assert torch.allclose(cond["c_concat"][0], expected, atol=1e-6) and cond["c_crossattn"][0].shape == (1, 77, 32)


def test_training_step_runs(tiny):
    batch = {"jpg": _image(6, 32, 32).permute(0, 2, 3, 1).repeat(2, 1, 1, 1), "txt": ["a", "b"]}
    torch.manual_seed(0)
    loss, logs = tiny.shared_step(batch)
    assert torch.isfinite(loss) and "val/loss" in logs
    assert not any(p.requires_grad for p in tiny.depth_model.parameters())


# ---- diffusers parity -------------------------------------------------------------------------------------------
def _diffusers_parts(model: LatentDepth2ImageDiffusion):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    import diffusers

    original = {"model": {"params": OmegaConf.to_container(OmegaConf.load(TINY).model.params, resolve=True)}}
    ckpt = {f"model.diffusion_model.{k}": v for k, v in model.model.diffusion_model.state_dict().items()}
    cfg = single_file.create_unet_diffusers_config_from_ldm(original, ckpt)
    assert cfg["in_channels"] == 5
    unet = diffusers.UNet2DConditionModel(**cfg).eval()
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, cfg), strict=True)
    vae_ckpt = {f"first_stage_model.{k}": v for k, v in model.first_stage_model.state_dict().items()}
    vae_cfg = single_file.create_vae_diffusers_config_from_ldm(original, vae_ckpt, scaling_factor=0.18215)
    vae = diffusers.AutoencoderKL(**vae_cfg).eval()
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(vae_ckpt, vae_cfg), strict=True)
    return unet, vae, diffusers


def test_unet_with_depth_channel_matches_diffusers(tiny):
    unet, _, _ = _diffusers_parts(tiny)
    g = torch.Generator().manual_seed(7)
    x, t, context = torch.randn(2, 5, 12, 10, generator=g), torch.tensor([999, 37]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours = tiny.model.diffusion_model(x, t, context=context)
        ref = unet(x, t, encoder_hidden_states=context).sample
        flipped = x.clone()
        flipped[:, 4] = -flipped[:, 4]
        other_depth = tiny.model.diffusion_model(flipped, t, context=context)
    assert ours.std() > 0.1 and rel_err(other_depth, ours) > 1e-3  # the depth channel matters
    err = rel_err(ours, ref)
    print(f"depth UNet vs diffusers: rel err {err:.1e}")
    assert err < 1e-5


def test_depth2img_matches_diffusers_depth2img_pipeline(tiny):
    """diffusers' StableDiffusionDepth2ImgPipeline on the same weights (UNet, VAE by diffusers' converters; depth by
    transformers' DPT-Hybrid with our MiDaS weights), DDIM, 4 steps at strength 0.75, guidance 5: the same seed gives
    the same image. Harness: diffusers' VAE encodes to the posterior mean, as our img2img does (its default draws a
    sample from the generator first); the image is at the MiDaS size, so neither side resizes it for MiDaS."""
    unet, vae, diffusers = _diffusers_parts(tiny)
    dpt, transformers = _transformers_dpt(tiny)
    from types import SimpleNamespace

    encode = vae.encode
    vae.encode = lambda x, return_dict=True: SimpleNamespace(latents=encode(x).latent_dist.mode())
    schedule = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    processor = transformers.DPTImageProcessor(do_resize=False, do_rescale=True, do_normalize=True,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, depth_estimator=dpt, feature_extractor=processor,
        scheduler=diffusers.DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                          timestep_spacing="leading"))
    pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        context = tiny.get_learned_conditioning(["a stone bridge over a river", "blurry"])
    seed, kw = 12, dict(steps=4, guidance_scale=5.0, strength=0.75, sampler="ddim", progress=False)
    image = Image.fromarray(pixels)
    ref = pipe(image=image, prompt_embeds=context[:1], negative_prompt_embeds=context[1:], num_inference_steps=4,
               guidance_scale=5.0, strength=0.75, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ours = depth2img(tiny, ["a stone bridge over a river"], image_to_tensor(image), seeds=[seed], negative_prompt="blurry",
                     **kw)
    assert ours.shape == ref.shape == (1, 3, 64, 64) and ref.std() > 0.05
    err = rel_err(ours, ref)
    print(f"depth2img vs diffusers StableDiffusionDepth2ImgPipeline: rel err {err:.1e}")
    assert err < 1e-5
    # A depth map of one's own replaces the estimate on both sides (diffusers' depth_map argument).
    own = torch.rand(1, 20, 30, generator=torch.Generator().manual_seed(9))
    ref = pipe(image=image, depth_map=own, prompt_embeds=context[:1], negative_prompt_embeds=context[1:],
               num_inference_steps=4, guidance_scale=5.0, strength=0.75, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    ours = depth2img(tiny, ["a stone bridge over a river"], image_to_tensor(image), seeds=[seed], negative_prompt="blurry",
                     depth_map=own[None], **kw)
    assert rel_err(ours, ref) < 1e-5


# ---- where the MiDaS weights come from -------------------------------------------------------------------------
def test_midas_weights_from_the_checkpoint_or_a_file(tiny, tmp_path):
    ckpt = tmp_path / "tiny-depth.safetensors"
    save_model(tiny, ckpt)
    x = _image(10, 64, 64)
    expected = tiny.estimate_depth(x)
    loaded = load_model(TINY, ckpt)  # the checkpoint holds depth_model.* (as 512-depth-ema does)
    assert loaded.depth_model.has_weights and torch.equal(loaded.estimate_depth(x), expected)

    bare = tmp_path / "no-depth.safetensors"
    save_state_dict({k: v for k, v in read_state_dict(ckpt).items() if not k.startswith("depth_model.")}, bare)
    without = load_model(TINY, bare)  # loads; a depth map still works, estimating names the setting
    assert not without.depth_model.has_weights
    with pytest.raises(ValueError, match="midas_weights is not set; set midas_weights to the MiDaS file") as err:
        without.estimate_depth(x)
    assert len(str(err.value).splitlines()) == 1
    assert depth2img(without, ["x"], x, seeds=[0], steps=1, progress=False, depth_map=torch.rand(1, 1, 8, 8)).shape == \
        (1, 3, 64, 64)

    midas = tmp_path / "dpt_hybrid-midas-501f0c75.pt"  # MiDaS' own layout: bare pretrained.* / scratch.* keys
    torch.save({k: v.clone() for k, v in tiny.depth_model.model.state_dict().items()}, midas)
    from_file = load_model(with_midas_weights(OmegaConf.load(TINY).model, str(midas)), bare)
    assert from_file.depth_model.has_weights and torch.equal(from_file.estimate_depth(x), expected)
    built = build_model(with_midas_weights(OmegaConf.load(TINY).model, str(midas)))  # built for real: read at once
    assert torch.equal(built.estimate_depth(x), expected)
    with pytest.raises(Exception, match="midas_weights: file .*missing.pt' not found"):
        load_model(with_midas_weights(OmegaConf.load(TINY).model, str(tmp_path / "missing.pt")), bare)


# ---- the script -----------------------------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("_script_depth2img", ROOT / "scripts" / "depth2img.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_depth2img_script_writes_pngs_with_a_recipe_that_regenerates(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    script = _script()
    ckpt = tmp_path / "tiny-depth.safetensors"
    save_model(tiny, ckpt)
    init = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    model = ["--config", str(TINY), "--ckpt", str(ckpt)]
    argv = ["--init-img", str(init), "--prompt", "a tiny robot", "--strength", "0.8", "--ddim_steps", "3",
            "--seed", "5", "--n_samples", "1", "--n_iter", "1", "--outdir", str(out), *model]
    start = time.perf_counter()
    assert script.run(argv) == 0
    print(f"scripts/depth2img.py on the tiny model: {time.perf_counter() - start:.1f} s")
    (png,) = sorted((out / "samples").iterdir())
    assert Image.open(png).size == (56, 40)
    meta = read_metadata(png)
    assert (meta["script"], meta["strength"], meta["steps"], meta["seed"], meta["depth_map"]) == \
        ("depth2img", 0.8, 3, 5, None)
    assert meta["init_img"] == str(init) and "init_img_sha256" in meta and (out / "grid-0000.png").is_file()
    assert script.run(["--regenerate", str(png), "--outdir", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "00001.png")), np.asarray(Image.open(png)))

    # A 16-bit depth map of one's own, with a checkpoint that has no MiDaS weights.
    bare = tmp_path / "no-depth.safetensors"
    save_state_dict({k: v for k, v in read_state_dict(ckpt).items() if not k.startswith("depth_model.")}, bare)
    depth = tmp_path / "depth16.png"
    Image.fromarray(np.linspace(0, 65535, 20 * 28).reshape(20, 28).astype(np.uint16)).save(depth)
    assert read_depth_map(depth).amax() == 1.0 and read_depth_map(depth).shape == (1, 1, 20, 28)
    bare_model = ["--config", str(TINY), "--ckpt", str(bare)]
    assert script.run([*argv[:-len(model)], "--depth-map", str(depth), "--outdir", str(tmp_path / "own"), *bare_model]) == 0
    assert read_metadata(tmp_path / "own" / "samples" / "00000.png")["depth_map"] == str(depth)

    # One-line errors, nothing written: no weights and no depth map; a missing weights file; not a depth model.
    capsys.readouterr()
    cases = [(bare_model, "midas_weights is not set"),
             ([*bare_model, "--midas_weights", str(tmp_path / "nope.pt")], "midas_weights: file"),
             (["--config", str(ROOT / "configs/tiny/tiny-sd2-v.yaml"), "--ckpt", str(ckpt)], "is not a depth-to-image")]
    for i, (extra, message) in enumerate(cases):
        no = tmp_path / f"no{i}"
        assert script.run([*argv[:-len(model)], "--outdir", str(no), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not no.exists(), err
    assert script.run(["--help"]) == 0 and "depth_map (str | null" in capsys.readouterr().out


def test_console_command_is_declared():
    import tomllib

    from ldm import cli

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["ldm-depth2img"] == "ldm.cli:depth2img"
    assert callable(cli.depth2img) and (ROOT / "configs" / "depth2img.yaml").is_file()
