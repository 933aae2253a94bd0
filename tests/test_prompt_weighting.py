"""Prompt weighting (AUTOMATIC1111 syntax): the parser, the token layout, and every text encoder's weighted features
against an independent computation; plain prompts encode bit for bit as before, weighting on or off."""
import copy

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_weights import (BREAK, apply_weights, chunk_weighted, parse_prompt,
                                                 prompt_weighting)
from tests.helpers import randomize_

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=49408, max_position_embeddings=77)
TINY_OPENCLIP = dict(embed_dim=16, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3))
PLAIN = ["a photo of a cat", "Crème brûlée, 猫の写真 don't stop", "", "a fox in the snow, golden hour, " * 12,
         "question? yes! 16 9 - ok"]

# AUTOMATIC1111's documented examples (modules/prompt_parser.py), as (text, weight) fragments.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
]
MORE_EXAMPLES = [
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]", [("word", 1 / 1.1 / 1.1)]),           # unbalanced square bracket: to the end
    ("(word:1.3)", [("word", 1.3)]),
    ("( word : 0.5 )", [(" word ", 0.5)]),           # spaces around the weight, as newer AUTOMATIC1111
    ("a ] b ) c", [("a ] b ) c", 1.0)]),               # stray closing brackets are text
    ("x:1.3) y", [("x:1.3) y", 1.0)]),                 # a weight with no bracket open is text
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),                  # weights only close round brackets
    ("\\(literal\\)", [("(literal)", 1.0)]),
    ("\\[x\\] \\\\ y", [("[x] \\ y", 1.0)]),
    ("a \\b", [("a b", 1.0)]),                          # a backslash before anything else vanishes
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),                  # not a number: text (AUTOMATIC1111 raised)
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK a", [("", 1.0), BREAK, ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), BREAK, ("", 1.0)]),
    ("a BREAKING break b", [("a BREAKING break b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),   # ours still breaks inside brackets
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES + MORE_EXAMPLES)
def test_parser_matches_automatic1111(text, expected):
    got = parse_prompt(text)
    assert [f.text for f in got] == [e[0] for e in expected]
    assert [f.weight for f in got] == pytest.approx([e[1] for e in expected])
    assert all((f is BREAK) == (tuple(e) == tuple(BREAK)) for f, e in zip(got, expected))


def test_chunk_layout_cuts_every_75_and_breaks():
    ids = list(range(200))
    plain = chunk_weighted([(ids, 1.0)], 75)
    assert [w[0] for w in plain] == [ids[:75], ids[75:150], ids[150:]]
    assert chunk_weighted([([], 1.0)], 75) == [([], [])]
    assert chunk_weighted([(list(range(75)), 1.0)], 75) == [(list(range(75)), [1.0] * 75)]
    split = chunk_weighted([([1, 2], 1.0), None, ([3], 1.5)], 75)
    assert split == [([1, 2], [1.0, 1.0]), ([3], [1.5])]
    assert len(chunk_weighted([None, ([3], 1.0)], 75)) == 2  # BREAK first: an empty window, as AUTOMATIC1111
    assert len(chunk_weighted([([3], 1.0), None], 75)) == 1


def _encoders():
    torch.manual_seed(0)
    clip = randomize_(FrozenCLIPEmbedder(text_config=TINY_HF), 1)
    openclip = randomize_(FrozenOpenCLIPEmbedder(model_config=TINY_OPENCLIP, layer="penultimate"), 2)
    return {"clip": clip, "openclip": openclip}


@pytest.fixture(scope="module")
def encoders():
    return _encoders()


def raw_features(encoder, ids: list[int]) -> torch.Tensor:
    """One 77-token window straight through the transformer (no weighting code involved)."""
    bos, eos = 49406, 49407
    pad = eos if isinstance(encoder, FrozenCLIPEmbedder) else 0
    row = torch.tensor([[bos, *ids, eos] + [pad] * (75 - len(ids))])
    with torch.no_grad():
        return encoder.encode_tokens(row)[0]  # the encoder's layer choice, nothing else


def by_hand(encoder, fragments: list[tuple[str, float]]) -> torch.Tensor:
    """AUTOMATIC1111's emphasis computed independently: z * w, then z * (mean before / mean after)."""
    ids, weights = [], []
    for text, weight in fragments:
        piece = (encoder.tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(encoder, FrozenCLIPEmbedder)
                 else encoder.tokenizer.encode(text))
        ids += piece
        weights += [weight] * len(piece)
    z = raw_features(encoder, ids)
    w = torch.tensor([1.0, *weights, 1.0] + [1.0] * (75 - len(ids)))
    weighted = z * w[:, None]
    return weighted * (z.mean() / weighted.mean())


@pytest.mark.parametrize("name", ["clip", "openclip"])
def test_plain_prompts_are_bit_identical_with_weighting_on_and_off(encoders, name):
    encoder = encoders[name]
    with torch.no_grad():
        before = encoder(PLAIN)
        with prompt_weighting(encoder, False):
            off = encoder(PLAIN)
        with prompt_weighting(encoder):
            on = encoder(PLAIN)
            tokens_on = encoder.chunked_tokens(PLAIN)
    tokens_off = encoder.chunked_tokens(PLAIN)
    assert torch.equal(before, off) and torch.equal(before, on)
    assert torch.equal(tokens_on, tokens_off)
    assert not encoder.prompt_weighting  # switched back


@pytest.mark.parametrize("name", ["clip", "openclip"])
def test_weighted_prompt_matches_an_independent_computation(encoders, name):
    encoder = encoders[name]
    prompt = "a (red:1.4) fox [in] the ((snow))"
    fragments = [("a ", 1.0), ("red", 1.4), (" fox ", 1.0), ("in", 1 / 1.1), (" the ", 1.0), ("snow", 1.21)]
    with torch.no_grad(), prompt_weighting(encoder):
        got = encoder([prompt])[0]
    expected = by_hand(encoder, fragments)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = raw_features(encoder, by_hand_ids(encoder, "a red fox in the snow"))
    assert (got - plain).abs().max() > 1e-2  # the weights matter ...
    torch.testing.assert_close(got.mean(), plain.mean(), rtol=1e-4, atol=1e-6)  # ... and the mean is restored
    with torch.no_grad():
        assert not torch.equal(encoder([prompt])[0], got)  # weighting off: brackets are text


def by_hand_ids(encoder, text):
    if isinstance(encoder, FrozenCLIPEmbedder):
        return encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    return encoder.tokenizer.encode(text)


@pytest.mark.parametrize("name", ["clip", "openclip"])
def test_break_starts_a_new_window(encoders, name):
    encoder = encoders[name]
    with torch.no_grad(), prompt_weighting(encoder):
        z = encoder(["a red fox BREAK in the snow"])[0]
        tokens = encoder.chunked_tokens(["a red fox BREAK in the snow"])
    assert tokens.shape == (1, 2, 77) and z.shape[0] == 154
    # The two windows go through the transformer as one batch of 2, the references one at a time: kernel
    # rounding may differ with the batch size (seen: 1e-6), so this is float32 round-off, not bit equality.
    torch.testing.assert_close(z[:77], raw_features(encoder, by_hand_ids(encoder, "a red fox")), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[77:], raw_features(encoder, by_hand_ids(encoder, "in the snow")), rtol=1e-5, atol=1e-5)


def test_weights_apply_per_window_of_long_prompts(encoders):
    encoder = encoders["clip"]
    long = "a fox in the snow, golden hour, " * 12 + "(cat:1.5)"
    with torch.no_grad(), prompt_weighting(encoder):
        z = encoder([long])[0]
        tokens = encoder.chunked_tokens([long])
    with torch.no_grad():
        plain = encoder(["a fox in the snow, golden hour, " * 12 + "cat"])[0]
    assert tokens.shape[1] == 2
    assert torch.equal(z[:77], plain[:77])  # the first window has no weights: untouched
    assert not torch.equal(z[77:], plain[77:])


def test_apply_weights_keeps_unit_rows_and_survives_zero_mean_features():
    z = torch.randn(3, 77, 8)
    w = torch.ones(3, 77)
    w[1, 3] = 1.5
    out = apply_weights(z, w)
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2])
    torch.testing.assert_close(out[1].mean(), z[1].mean())
    centred = z - z.mean(dim=-1, keepdim=True)  # layer-normed features without a bias average to 0
    out = apply_weights(centred, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 3], centred[1, 3] * 1.5)  # the plain product, no division by ~0


def test_sdxl_both_encoders_weighted_pooled_not(tmp_path):
    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model("configs/tiny/tiny-sdxl.yaml").eval()
    clip, bigg = model.conditioner.text_encoders()
    randomize_(clip, 3)
    randomize_(bigg, 4)
    prompt, plain = "a (red:1.3) fox in [snow]", "a red fox in snow"
    fragments = [("a ", 1.0), ("red", 1.3), (" fox in ", 1.0), ("snow", 1 / 1.1)]
    batch = {"txt": [prompt], "original_size_as_tuple": torch.tensor([[64, 64]]),
             "crop_coords_top_left": torch.tensor([[0, 0]]), "target_size_as_tuple": torch.tensor([[64, 64]])}
    with torch.no_grad():
        before = model.conditioner({**batch, "txt": [plain]})
        with prompt_weighting(model):
            out = model.conditioner(batch)
            with_plain = model.conditioner({**batch, "txt": [plain]})
    expected = torch.cat([by_hand(clip, fragments), by_hand(bigg, fragments)], dim=-1)
    torch.testing.assert_close(out["crossattn"][0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["vector"], before["vector"])  # bigG's pooled output reads the same tokens, unweighted
    assert torch.equal(with_plain["crossattn"], before["crossattn"]) and torch.equal(with_plain["vector"], before["vector"])


def test_generate_setting_and_recipe_default(tmp_path):
    from ldm.api import build_model
    from ldm.generation import generate
    from ldm.run_config import apply_regeneration, literal_settings
    from ldm import settings as declaration

    torch.manual_seed(0)
    model = build_model("configs/tiny/tiny-sd1.yaml").eval()
    randomize_(model.cond_stage_model, 5)
    randomize_(model.model.diffusion_model, 6)  # CompVis zero-initialises the output: the prompt would not matter
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    common = dict(seeds=[3], height=16, width=16, steps=2, guidance_scale=4.0, progress=False, batch_invariant=True)
    plain_on = generate(model, ["a red fox"], **common)
    plain_off = generate(model, ["a red fox"], prompt_weighting=False, **common)
    weighted = generate(model, ["a (red:1.8) fox"], **common)
    literal = generate(model, ["a (red:1.8) fox"], prompt_weighting=False, **common)
    assert torch.equal(plain_on, plain_off)
    assert not torch.equal(weighted, literal) and not torch.equal(weighted, plain_on)
    assert declaration.by_name("txt2img")["prompt_weighting"].default is True
    # A recipe written before the setting existed regenerates as it was made: without weighting.
    meta = {"prompt": "a (b)", "seed": 1, "config": "c.yaml", "ckpt": "m.ckpt", "model_sha256": "0" * 64}
    settings = literal_settings(declaration.defaults("txt2img"))
    assert apply_regeneration(settings, meta, "txt2img")["prompt_weighting"] is False
    assert apply_regeneration(settings, {**meta, "prompt_weighting": True}, "txt2img")["prompt_weighting"] is True


def test_weighting_is_switched_per_call_and_restored(encoders):
    encoder = copy.deepcopy(encoders["clip"])
    encoder.prompt_weighting = True  # a caller's own choice survives a block that switches it
    with prompt_weighting(encoder, False):
        assert encoder.prompt_weighting is False
    assert encoder.prompt_weighting is True
