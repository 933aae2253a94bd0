"""Batched generation (the default): equal to per-image runs up to kernel rounding, grouped so that long prompts
never pad their neighbours, chunked by batch_size, one progress bar per run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import randomize_

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"
LONG = " ".join(["cat"] * 80)  # two 77-token windows
ATOL = 2e-4  # measured: ~1e-6 here; the bound leaves room for other CPUs' kernels


@pytest.fixture(scope="module")
def tiny():
    from ldm.api import build_model

    return randomize_(build_model(TINY).eval(), seed=3)


def _alone(model, prompts, seeds, **options):
    from ldm.generation import generate

    return torch.cat([generate(model, [p], seeds=[s], progress=False, **options) for p, s in zip(prompts, seeds)])


def test_batched_images_equal_lone_images_up_to_rounding(tiny):
    from ldm.generation import generate

    prompts = ["a red square", "a blue circle", "a green star", "a cat"]
    seeds = [5, 6, 7, 8]
    options = dict(steps=3, height=32, width=32, guidance_scale=4.0, sampler="euler_a")
    batched = generate(tiny, prompts, seeds=seeds, progress=False, **options)
    alone = _alone(tiny, prompts, seeds, **options)
    assert (batched - alone).abs().max() < ATOL
    # not trivially equal: the images differ from each other
    assert (batched[0] - batched[1]).abs().max() > 0.05
    # batch_invariant=True: each image on its own, bit for bit
    exact = generate(tiny, prompts, seeds=seeds, progress=False, batch_invariant=True, **options)
    assert torch.equal(exact, alone)
    # chunks of 3 then 1: same images
    chunked = generate(tiny, prompts, seeds=seeds, progress=False, batch_size=3, **options)
    assert (chunked - alone).abs().max() < ATOL


def test_long_prompts_do_not_share_a_batch_with_short_ones(tiny):
    from ldm.generation import batch_plan, context_windows, generate
    from ldm.settings import SamplingSettings

    prompts = ["a red square", LONG, "a cat", LONG + " again"]
    assert context_windows(tiny, prompts) == [1, 2, 1, 2]
    plan = batch_plan(tiny, prompts, [""] * 4, SamplingSettings())
    assert plan == [[0, 2], [1, 3]]
    assert batch_plan(tiny, prompts, [""] * 4, SamplingSettings(batch_size=1)) == [[0], [2], [1], [3]]
    assert batch_plan(tiny, prompts, ["", LONG, "", ""], SamplingSettings()) == [[0, 2], [1, 3]]
    assert batch_plan(tiny, prompts[:1], [LONG], SamplingSettings()) == [[0]]
    assert batch_plan(tiny, prompts, [""] * 4, SamplingSettings(batch_invariant=True)) == [[0], [1], [2], [3]]

    options = dict(steps=2, height=32, width=32, guidance_scale=3.0)
    batched = generate(tiny, prompts, seeds=[1, 2, 3, 4], progress=False, **options)
    alone = _alone(tiny, prompts, [1, 2, 3, 4], **options)
    assert (batched - alone).abs().max() < ATOL
    # What the grouping prevents: a short prompt batched with a long one sees a padded context.
    from ldm.generation import encode_prompts

    padded = encode_prompts(tiny, ["a red square", LONG], ["", ""])[0][0]
    own = encode_prompts(tiny, ["a red square"], [""])[0][0]
    assert padded.shape[0] == 2 * own.shape[0]


def test_one_progress_bar_counts_every_step_of_every_batch(tiny):
    from ldm.generation import generate
    from ldm.progress import RunProgress

    seen = []
    bar = RunProgress(batches=2, steps=4, enabled=False)
    for rows in ([0, 1], [2]):
        generate(tiny, ["a"] * len(rows), seeds=rows, progress=bar, steps=4, height=32, width=32,
                 callback=lambda info: seen.append(info["i"]))
    assert bar.steps_done == 8 and bar.total == 8 and seen == [0, 1, 2, 3] * 2
    # img2img runs fewer steps than asked: the total follows the first batch
    bar = RunProgress(batches=2, steps=10, enabled=False)
    init = torch.zeros(1, 3, 32, 32)
    for _ in range(2):
        generate(tiny, ["a"], seeds=[0], progress=bar, steps=10, strength=0.5, init_image=init, height=32, width=32)
    assert bar.steps_done == 10 and bar.total == 10


def test_repeated_prompts_are_encoded_once(tiny, monkeypatch):
    from ldm.generation import encode_prompts

    calls = []
    original = tiny.get_learned_conditioning
    monkeypatch.setattr(tiny, "get_learned_conditioning", lambda texts: calls.append(list(texts)) or original(texts))
    cond, uncond = encode_prompts(tiny, ["a cat"] * 3 + ["a dog"], [""] * 4)
    assert calls == [["a cat", "a dog", ""]]
    full = original(["a cat"] * 3 + ["a dog"] + [""] * 4)
    assert (torch.cat([cond, uncond]) - full).abs().max() < 1e-5
    assert torch.equal(cond[0], cond[2]) and torch.equal(uncond[0], uncond[3])


def test_channels_last_model_gives_the_same_images(tiny):
    """prepare_for_inference(channels_last=True): weights and activations channels-last, same images (rounding)."""
    import copy

    from ldm.generation import generate, prepare_for_inference

    model = copy.deepcopy(tiny)
    options = dict(steps=3, height=32, width=32, guidance_scale=3.0, progress=False)
    before = generate(model, ["a cat", "a dog"], seeds=[1, 2], **options)
    prepare_for_inference(model, "fp32", channels_last=True)
    unet = model.model.diffusion_model
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    decoder = model.first_stage_model.decoder
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen, decoded = [], []
    hook = unet.out.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    # the autoencoder's convolutions too: the last one's input and output stay channels-last (no NCHW round trip)
    hook2 = decoder.conv_out.register_forward_hook(lambda m, i, o: decoded.append(
        i[0].is_contiguous(memory_format=torch.channels_last) and o.is_contiguous(memory_format=torch.channels_last)))
    after = generate(model, ["a cat", "a dog"], seeds=[1, 2], **options)
    hook.remove()
    hook2.remove()
    assert seen and all(seen)  # activations stayed channels-last to the end
    assert decoded == [True]
    assert (after - before).abs().max() < 1e-3
    prepare_for_inference(model, "fp32", channels_last=False)
    assert unet.input_blocks[0][0].weight.is_contiguous() and decoder.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("precision, unet_cl", [("fp32", False), ("autocast", True), ("bf16", True)])
def test_default_layout_per_precision(tiny, precision, unet_cl):
    """channels_last=None: the UNet channels-last where its convolutions run in bf16/fp16 (weights or autocast);
    the autoencoder channels-last on a CPU in every precision (its fp32 decode is faster so too)."""
    import copy

    from ldm.generation import prepare_for_inference

    model = prepare_for_inference(copy.deepcopy(tiny), precision)
    conv = model.model.diffusion_model.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is unet_cl and conv.is_contiguous() is not unet_cl
    vae = model.first_stage_model.decoder.conv_in.weight
    assert vae.is_contiguous(memory_format=torch.channels_last) and not vae.is_contiguous()


def test_default_batch_fits_the_decode_in_free_memory(tiny, monkeypatch):
    """batch_size=null runs all images together unless their VAE decode would not fit: then as many as fit."""
    import ldm.generation as generation
    from ldm.generation import batch_plan, decode_memory_estimate
    from ldm.settings import SamplingSettings

    prompts = ["a cat"] * 5
    # the tiny VAE: ch 32, ch_mult [1, 2]; its widest full-resolution maps have 64 channels
    assert generation._decoder_shape(tiny) == {"ch": 32, "ch_mult": [1, 2]}
    per_image = decode_memory_estimate(512, 512, ch=32, ch_mult=[1, 2])
    assert per_image == 3 * 512 * 512 * 64 * 4
    monkeypatch.setattr(generation, "available_memory", lambda device: int(2.6 * per_image / 0.7))
    plan = batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=512, width=512))
    assert plan == [[0, 1], [2, 3], [4]]
    # bf16 halves the estimate; small images all fit; slicing decodes one image at a time; tiles bound the decode
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=512, width=512, precision="bf16")) == \
        [[0, 1, 2, 3, 4]]
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=256, width=256)) == [[0, 1, 2, 3, 4]]
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=512, width=512, vae_slicing=True)) == \
        [[0, 1, 2, 3, 4]]
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=1024, width=1024, vae_tiling=True,
                                                                vae_tile_size=32)) == [[0, 1, 2, 3, 4]]
    # an explicit batch_size is the user's
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=512, width=512, batch_size=5)) == \
        [[0, 1, 2, 3, 4]]
    monkeypatch.setattr(generation, "available_memory", lambda device: 1)  # never below one image
    assert batch_plan(tiny, prompts, [""] * 5, SamplingSettings(height=512, width=512)) == [[0], [1], [2], [3], [4]]
