"""ldm.lora: training state, kohya files (save / load / scale), merging, and loading our files in diffusers."""
import copy
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")

from ldm.lora import (
    add_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    set_lora_scale,
)
from ldm.util import instantiate_from_config
from tests.helpers import random_model, randomize_

CONFIG = "configs/tiny/tiny-sd1.yaml"
DEFAULT_UNET = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# Every kind of UNet layer the kohya naming covers: attention, transformer projections and MLP,
# resnets, down/up samplers, time embedding, conv_in / conv_out.
ALL_UNET = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "in_layers.2",
            "emb_layers.1", "out_layers.3", "skip_connection", "op", "conv", "time_embed.0", "time_embed.2",
            "input_blocks.0.0", "out.2")
ALL_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def base():
    return random_model(CONFIG, unet_seed=1)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def forward(model, grad=False):
    """Prompt -> (LoRA'd) text encoder -> (LoRA'd) UNet, on fixed inputs."""
    g = torch.Generator().manual_seed(11)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 90])
    with torch.set_grad_enabled(grad):
        c = model.get_learned_conditioning(["a red house by the sea", "a cat"])
        return model.model.diffusion_model(x, t, c).float()


def randomize_lora_(model, seed, std=0.3):
    """Nonzero LoRA up-weights (fresh adapters have B = 0, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[1] ** 0.5)


def lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def test_add_lora_freezes_base_and_keeps_fp32_adapters_in_bf16_model(model):
    model = model.to(torch.bfloat16)
    for m in model.modules():  # CPU group_norm rejects bf16 weights on GroupNorm32's fp32 input
        if isinstance(m, torch.nn.GroupNorm):
            m.float()
    keys = set(model.state_dict())
    targeted = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (
        (n.startswith("model.diffusion_model.") and DEFAULT_UNET.search(n))
        or (n.startswith("cond_stage_model.") and re.search(r"self_attn\.(q|k|v|out)_proj$", n)))}
    assert len(targeted) == 7 * 8 + 2 * 4  # 7 transformers x 2 attentions x 4, 2 CLIP layers x 4
    before = forward(model)
    model.requires_grad_(True)  # e.g. cond_stage_trainable: add_lora must still freeze everything else
    params = add_lora(model, text_encoder=True)
    assert torch.equal(forward(model), before)  # B = 0: bit-for-bit unchanged

    assert sorted(lora_modules(model)) == sorted(targeted)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == len(trainable) == 2 * len(targeted)
    assert {id(p) for p in params} == {id(p) for p in trainable.values()}
    assert all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in params)
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    assert layer.base_layer.weight.dtype == torch.bfloat16

    forward(model, grad=True).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(trainable) and all(g.dtype == torch.float32 for g in grads.values())
    assert all((g.abs().sum() > 0) == (".lora_B." in n) for n, g in grads.items())  # A's are 0 while B = 0 ...
    # ... and the base keys stay as they were; LoRA adds <module>.lora_{A,B}.default.weight.
    state = model.state_dict()
    assert set(state) == keys | {f"{n}.lora_{ab}.default.weight" for n in targeted for ab in "AB"}


def test_training_changes_only_lora_and_resumes_from_state_dict(model, base):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = add_lora(model, rank=2, alpha=4)
    target = forward(base) + 0.3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(6):
        loss = (forward(model, grad=True) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    lora = {k: v for k, v in state.items() if k not in before}
    assert len(lora) == 2 * 56 and all(v.abs().sum() > 0 for v in lora.values())  # B left zero, A moved

    # A Lightning-style checkpoint of the LoRA'd model restores strictly into add_lora(same config).
    resumed = copy.deepcopy(base)
    add_lora(resumed, rank=2, alpha=4)
    resumed.load_state_dict(state, strict=True)
    assert torch.equal(forward(resumed), forward(model))


def test_save_load_round_trip_and_scale(model, base, tmp_path):
    add_lora(model, text_encoder=True, rank=4, alpha=2.0)
    randomize_lora_(model, seed=3)
    with_lora = forward(model)
    path = tmp_path / "style.safetensors"
    save_lora(model, path, metadata={"steps": 5})
    save_lora(model, path, metadata={"steps": 6})  # overwrite in place: no leftovers
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["steps"] == "6" and f.metadata()["ss_network_dim"] == "4"
        assert f.metadata()["ss_network_alpha"] == "2" and f.get_tensor(f.keys()[0]).dtype == torch.float32

    fresh = copy.deepcopy(base)
    plain = forward(fresh)
    assert (with_lora - plain).abs().max() > 1e-2  # the LoRA matters
    load_lora(fresh, path)
    assert torch.allclose(forward(fresh), with_lora, atol=1e-6, rtol=0)
    load_lora(fresh, path, scale=0.0)  # replaces the adapters rather than stacking them
    assert len(lora_modules(fresh)) == 64
    assert torch.equal(forward(fresh), plain)
    set_lora_scale(fresh, 0.5)
    half = forward(fresh)
    ratio = ((half - plain).norm() / (with_lora - plain).norm()).item()
    assert 0.3 < ratio < 0.7

    # One layer is exactly linear in scale: delta(0.5) == 0.5 * delta(1).
    layer = fresh.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_v
    x = torch.randn(3, layer.base_layer.in_features)
    out = {}
    for s in (0.0, 0.5, 1.0):
        set_lora_scale(fresh, s)
        out[s] = layer(x)
    assert (out[1.0] - out[0.0]).abs().max() > 1e-3
    torch.testing.assert_close(out[0.5] - out[0.0], 0.5 * (out[1.0] - out[0.0]), atol=1e-6, rtol=0)


def test_load_uses_rank_alpha_per_module_and_kohya_delta(model, tmp_path):
    """W' = W + scale * alpha / r * up @ down, with each module's own rank and alpha (CompVis-named keys too)."""
    g = torch.Generator().manual_seed(4)
    unet = model.model.diffusion_model
    q = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    k = unet.output_blocks[2][1].transformer_blocks[0].attn2.to_k
    spec = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (q, 2, 3.0),
            "lora_unet_output_blocks_2_1_transformer_blocks_0_attn2_to_k": (k, 5, 1.0)}  # CompVis spelling
    state = {}
    for key, (layer, r, alpha) in spec.items():
        state[f"{key}.lora_down.weight"] = torch.randn(r, layer.in_features, generator=g).half()
        state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, r, generator=g).half()
        state[f"{key}.alpha"] = torch.tensor(alpha).half()
    save_file(state, str(tmp_path / "x.safetensors"))
    load_lora(model, tmp_path / "x.safetensors", scale=0.7)
    for key, (layer, r, alpha) in spec.items():
        wrapped = model.get_submodule(next(n for n, m in model.named_modules() if getattr(m, "base_layer", None) is layer))
        assert wrapped.r["default"] == r
        x = torch.randn(4, layer.in_features, generator=g)
        delta = x @ (state[f"{key}.lora_up.weight"].float() @ state[f"{key}.lora_down.weight"].float()).T
        torch.testing.assert_close(wrapped(x) - layer(x), 0.7 * alpha / r * delta, atol=1e-5, rtol=1e-5)


def test_merge_equals_lora_model_and_gives_plain_checkpoint(model, base):
    keys = list(base.state_dict())
    add_lora(model, unet_targets=ALL_UNET, text_encoder=True, text_targets=ALL_TEXT)
    randomize_lora_(model, seed=6)
    with_lora = forward(model)
    merge_lora(model)
    assert lora_modules(model) == []
    state = model.state_dict()
    assert list(state) == keys
    torch.testing.assert_close(forward(model), with_lora, atol=1e-5, rtol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in base.parameters()]
    reloaded = copy.deepcopy(base)
    reloaded.load_state_dict(state, strict=True)
    assert torch.equal(forward(reloaded), forward(model))


def test_merge_changes_only_targeted_weights(model, base):
    add_lora(model, unet_targets=("attn2.to_k", "attn2.to_v"))
    randomize_lora_(model, seed=7)
    merge_lora(model)
    old, new = base.state_dict(), model.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    # Every other tensor (ResBlocks, attn1, VAE, text encoder) is bit-identical.
    assert changed == {k for k in old if re.fullmatch(r"model\.diffusion_model\..*\.attn2\.to_[kv]\.weight", k)}
    assert len(changed) == 14


def test_remove_lora_restores_the_base_model(model, base):
    add_lora(model, text_encoder=True)
    randomize_lora_(model, seed=8)
    remove_lora(model)
    assert lora_modules(model) == [] and list(model.state_dict()) == list(base.state_dict())
    assert torch.equal(forward(model), forward(base))
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in base.parameters()]


def test_bad_files_and_arguments_raise_one_line_errors(model, tmp_path):
    add_lora(model)
    good = lora_state_dict(model)
    before = model.state_dict()

    def check(state, *fragments):
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError) as err:
            load_lora(model, path)
        assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)
        assert model.state_dict().keys() == before.keys()  # the model's adapters are untouched

    missing = "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q"
    check({**good, f"{missing}.lora_down.weight": torch.zeros(4, 32), f"{missing}.lora_up.weight": torch.zeros(32, 4)},
          "1 of 57", missing)
    check({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)},
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    check({**good, f"{key}.lora_down.weight": torch.zeros(4, 48)}, key, "[4, 48]")  # another model's width
    check({**good, f"{key}.hada_w1_a": torch.zeros(4, 64)}, key)  # LyCORIS, not plain LoRA

    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    remove_lora(model)
    with pytest.raises(ValueError, match="to_qq"):
        add_lora(model, unet_targets=("to_q", "to_qq"))


@pytest.mark.slow
def test_diffusers_loads_our_file_and_matches(base, tmp_path):
    """Our kohya file in diffusers' StableDiffusionPipeline.load_lora_weights: same images as ours."""
    from benchmarks.peers import diffusers_sd1_pipeline
    from ldm.generation import generate

    pipe = diffusers_sd1_pipeline(base, CONFIG, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    model = copy.deepcopy(base)
    add_lora(model, unet_targets=ALL_UNET, text_encoder=True, text_targets=ALL_TEXT)
    randomize_lora_(model, seed=9)
    path = save_lora(model, tmp_path / "lora.safetensors")

    # Every key names a diffusers module (diffusers' own module tree), with matching shapes.
    named = {"lora_unet_" + n.replace(".", "_"): m for n, m in pipe.unet.named_modules()}
    named.update({"lora_te_" + ("" if n.startswith("text_model.") else "text_model_") + n.replace(".", "_"): m
                  for n, m in pipe.text_encoder.named_modules()})
    state = load_file(str(path))
    modules = {k.split(".")[0] for k in state}
    assert len(modules) == 119 + 12  # UNet + text encoder layers targeted above
    for key in modules:
        w = named[key].weight
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        assert down.shape[1:] == w.shape[1:] and up.shape[0] == w.shape[0] and state[f"{key}.alpha"].item() == 4.0
    assert {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0",
            "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_up_blocks_0_upsamplers_0_conv",
            "lora_te_text_model_encoder_layers_1_mlp_fc2"} <= modules

    pipe.load_lora_weights(str(path))
    loaded = [n for n, _ in [*pipe.unet.named_modules(), *pipe.text_encoder.named_modules()] if n.endswith(".lora_A")]
    assert len(loaded) == len(modules)
    prompts, seeds = ["a photo of a cat", "a red house"], [5, 6]
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ref = pipe(prompts, height=32, width=32, num_inference_steps=4, guidance_scale=5, latents=noise,
               output_type="pt").images
    ours = generate(model, prompts, seeds=seeds, height=32, width=32, steps=4, guidance_scale=5, progress=False)
    plain = generate(base, prompts, seeds=seeds, height=32, width=32, steps=4, guidance_scale=5, progress=False)
    assert (ours - plain).abs().max() > 0.05  # the LoRA matters ...
    assert (ours - ref).abs().max().item() < 1e-4  # ... and diffusers applies it exactly as we do


@pytest.mark.slow
def test_unet_layout_follows_the_unets_own_structure(tmp_path):
    """3 levels x 2 res blocks, attention on all but the deepest level (as SD 1.x), depth-2 linear transformers: diffusers'
    own conversion of the same weights applies our file identically."""
    diffusers = pytest.importorskip("diffusers")
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    params = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
              "attention_resolutions": [1, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_head_channels": 16,
              "use_linear_in_transformer": True, "use_spatial_transformer": True, "transformer_depth": 2,
              "context_dim": 32, "legacy": False}
    torch.manual_seed(0)
    unet = randomize_(instantiate_from_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                               "params": params}).eval(), seed=2)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2]}}}}}}
    config = single_file.create_unet_diffusers_config_from_ldm(original, ckpt)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ref.load_state_dict(single_file.convert_ldm_unet_checkpoint(ckpt, config), strict=True)

    holder = torch.nn.Module()  # add_lora only needs .model.diffusion_model
    holder.model = torch.nn.Module()
    holder.model.diffusion_model = unet
    add_lora(holder, unet_targets=ALL_UNET)
    randomize_lora_(holder, seed=10)
    path = save_lora(holder, tmp_path / "unet.safetensors")
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref)
    assert sum(n.endswith(".lora_A") for n, _ in ref.named_modules()) == len(lora_modules(holder)) == 311
    g = torch.Generator().manual_seed(12)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 800]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        ours, theirs = unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample
        set_lora_scale(holder, 0.0)
        assert (ours - unet(x, t, ctx)).abs().max() > 0.05
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_export_writes_the_merged_ema_model_and_leaves_the_live_model_alone(model, tmp_path):
    import os

    from omegaconf import OmegaConf

    from ldm.callbacks import export_for_sampling
    from ldm.modules.ema import LitEma

    add_lora(model, rank=4, text_encoder=True)
    randomize_lora_(model, seed=3)
    model.use_ema = True
    model.model_ema = LitEma(model.model)  # EMA of the UNet adapters, as ldm.trainer.build_model sets up
    randomize_lora_(model, seed=4)  # the live adapters differ from their EMA
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # What the export was before it stopped mutating the model: EMA in, save the adapters, merge in place.
    reference = copy.deepcopy(model)
    reference.model_ema.copy_to(reference.model)
    expected_lora = lora_state_dict(reference)
    merge_lora(reference)
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("model_ema.")}
    old_mask = os.umask(0o022)
    try:
        path = export_for_sampling(model, OmegaConf.load(CONFIG).model, tmp_path / "export")
    finally:
        os.umask(old_mask)
    exported, exported_lora = load_file(path), load_file(tmp_path / "export" / "lora.safetensors")
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], v) for k, v in expected.items())
    assert exported_lora.keys() == expected_lora.keys()
    assert all(torch.equal(exported_lora[k], v) for k, v in expected_lora.items())
    assert all(not torch.equal(exported[k], before[k]) for k in exported if k.endswith("attn1.to_q.weight"))
    # The live model: adapters still injected and unmerged, every tensor as before the export.
    assert lora_modules(model) and model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for name in ("model.safetensors", "lora.safetensors", "config.yaml"):
        assert (tmp_path / "export" / name).stat().st_mode & 0o777 == 0o644, name
