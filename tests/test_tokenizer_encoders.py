"""Tokenizer and text-encoder tests: exact CLIP ids, checkpoint key layouts, layer selection."""
from __future__ import annotations

import re

import open_clip
import pytest
import torch
from transformers import CLIPTextModel

from ldm.modules.encoders.modules import ClassEmbedder, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer

BOS, EOS = 49406, 49407
LONG_PROMPT = "a highly detailed photograph of a red fox, in the snow, golden hour, " * 10
PROMPTS = [
    "a photo of a cat",
    "Hello, world! It's 5pm... isn't it?",
    "Crème brûlée à la façon de Zoë, naïve café",
    "a cat 🐱 riding a 🚀 over 東京, 猫の写真 and 고양이",
    "MiXeD CaSe PROMPT With UPPER Letters",
    "   extra    whitespace\t\tand\nnewlines   ",
    "digits 1234567 and symbols @#$%^&*()[]{}<>~`|\\/ --ar 16:9",
    "don't we'll they're I'm you've he'd",
    "",
    LONG_PROMPT,
]
TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=49408, max_position_embeddings=77)
TINY_OPENCLIP = dict(embed_dim=16, text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=3))


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """transformers' CLIPTokenizer built offline from vocab.json/merges.txt derived from open_clip's BPE file.

    transformers 5 has no pure-python CLIP tokenizer any more; its CLIPTokenizer runs the Rust
    ``tokenizers`` BPE, which is still an implementation independent of open_clip's.
    """
    from benchmarks.peers import hf_clip_tokenizer

    hf = hf_clip_tokenizer(tmp_path_factory.mktemp("hf_clip_tokenizer"))
    assert len(hf) == 49408
    return hf


# ---------------------------------------------------------------- tokenizer


def test_known_openai_ids(tok: CLIPTokenizer) -> None:
    cat = [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert tok("a photo of a cat")[0].tolist() == cat + [EOS] * (77 - len(cat))
    sd2 = CLIPTokenizer(pad_with_eos=False)
    assert sd2.pad_id == 0 and tok.pad_id == EOS
    assert sd2("a photo of a cat")[0].tolist() == cat + [0] * (77 - len(cat))
    assert tok.encode("A photo of a DOG") == [320, 1125, 539, 320, 1929]
    assert tok.encode("Hello, world!") == [3306, 267, 1002, 256]
    assert tok("")[0, :2].tolist() == [BOS, EOS]
    # ftfy un-curls quotes and html entities are unescaped, as in OpenAI's reference tokenizer.
    assert tok.encode("it\u2019s") == tok.encode("it's") == [585, 568]
    assert tok.encode("cats &amp; dogs") == tok.encode("cats & dogs")


def test_matches_open_clip_tokenize() -> None:
    sd2 = CLIPTokenizer(pad_with_eos=False)
    assert torch.equal(sd2(PROMPTS), open_clip.tokenize(PROMPTS))


@pytest.mark.parametrize("prompt", PROMPTS + ["a <|endoftext|> b"])
def test_matches_transformers_tokenizer(tok: CLIPTokenizer, hf_tokenizer, prompt: str) -> None:
    ref = hf_tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok(prompt)[0].tolist() == ref


def test_batch_and_truncation(tok: CLIPTokenizer) -> None:
    ids = tok.encode(LONG_PROMPT)
    assert len(ids) > 150
    out = tok([LONG_PROMPT, "a photo of a cat"])
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert out[0].tolist() == [BOS] + ids[:75] + [EOS]


def test_chunked_long_prompt(tok: CLIPTokenizer) -> None:
    ids = tok.encode(LONG_PROMPT)
    chunks = tok.chunked([LONG_PROMPT, "a photo of a cat"])
    n = -(-len(ids) // 75)
    assert chunks.shape == (2, n, 77)
    inner = []
    for row in chunks[0].tolist():
        assert row[0] == BOS
        body = row[1 : row.index(EOS, 1)]
        assert len(body) <= 75
        inner += body
    assert inner == ids
    # The short prompt: first chunk is its normal row, then empty chunks (BOS, EOS, padding).
    assert torch.equal(chunks[1, 0], tok("a photo of a cat")[0])
    assert chunks[1, 1:].tolist() == [[BOS] + [EOS] * 76] * (n - 1)
    assert CLIPTokenizer(pad_with_eos=False).chunked("")[0, 0, :3].tolist() == [BOS, EOS, 0]


def test_chunked_short_prompt_is_single_call_row(tok: CLIPTokenizer) -> None:
    exact = " ".join(["cat"] * 75)  # exactly one full chunk
    assert len(tok.encode(exact)) == 75
    for prompt in ["a photo of a cat", exact, ""]:
        chunks = tok.chunked(prompt)
        assert chunks.shape == (1, 1, 77)
        assert torch.equal(chunks[:, 0], tok(prompt))
    assert tok.chunked(exact + " cat").shape == (1, 2, 77)


# ---------------------------------------------------------------- FrozenCLIPEmbedder


def _reference_clip(emb: FrozenCLIPEmbedder) -> CLIPTextModel:
    """A plain transformers CLIPTextModel holding the embedder's weights."""
    ref = CLIPTextModel(emb.transformer.config).eval()
    tower = getattr(ref, "text_model", ref)  # transformers 4.x nests the tower, 5.x does not
    prefix = "transformer.text_model."
    state = {k[len(prefix):]: v for k, v in emb.state_dict().items()}
    tower.load_state_dict(state, strict=True)
    return ref


def test_clip_embedder_keys_and_outputs() -> None:
    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder(text_config=TINY_HF)
    keys = list(emb.state_dict())
    assert keys and all(k.startswith("transformer.text_model.") for k in keys)
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.final_layer_norm.weight" in keys
    assert not any("position_ids" in k for k in keys)
    assert not emb.training and not any(p.requires_grad for p in emb.parameters())

    prompts = ["a photo of a cat", "Hello, world!"]
    tokens = emb.tokenize(prompts)
    ref = _reference_clip(emb)
    with torch.no_grad():
        ref_out = ref(input_ids=tokens, output_hidden_states=True)
        last = emb(prompts)
        assert last.shape == (2, 77, 32)
        torch.testing.assert_close(last, ref_out.last_hidden_state)

        for kwargs in (dict(layer="penultimate"), dict(layer="hidden", layer_idx=-2)):
            other = FrozenCLIPEmbedder(text_config=TINY_HF, **kwargs)
            other.load_state_dict(emb.state_dict())
            out = other.encode(prompts)
            assert out.shape == (2, 77, 32)
            torch.testing.assert_close(out, ref_out.hidden_states[-2])
            assert not torch.allclose(out, last)

        pooled = FrozenCLIPEmbedder(text_config=TINY_HF, layer="pooled")
        pooled.load_state_dict(emb.state_dict())
        out = pooled(prompts)
        assert out.shape == (2, 1, 32)
        torch.testing.assert_close(out[:, 0], ref_out.pooler_output)


def test_clip_embedder_meta_builds() -> None:
    with torch.device("meta"):
        tiny = FrozenCLIPEmbedder(text_config=TINY_HF)
        full = FrozenCLIPEmbedder()
    assert tiny.device.type == "meta" and full.device.type == "meta"
    state = full.state_dict()
    assert len(state) == 196
    assert all(k.startswith("transformer.text_model.") for k in state)
    assert sum(p.numel() for p in full.parameters()) == 123_060_480
    assert full.transformer.text_model.embeddings.token_embedding.weight.shape == (49408, 768)
    b32 = FrozenCLIPEmbedder("openai/clip-vit-base-patch32", device="cuda")  # device ignored: builds on CPU
    assert b32.device.type == "cpu" and b32.transformer.config.hidden_size == 512


# ---------------------------------------------------------------- FrozenOpenCLIPEmbedder

_OPENCLIP_KEY = re.compile(
    r"model\.(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale"
    r"|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)"
    r"|transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))"
)


def test_openclip_embedder_keys_and_penultimate() -> None:
    torch.manual_seed(0)
    emb = FrozenOpenCLIPEmbedder(layer="penultimate", model_config=TINY_OPENCLIP)
    keys = list(emb.state_dict())
    assert all(_OPENCLIP_KEY.fullmatch(k) for k in keys), keys
    assert len(keys) == 6 + 12 * 3 and not hasattr(emb.model, "visual")
    assert "model.attn_mask" not in keys and emb.layer_idx == 1

    prompts = ["a photo of a cat", "Hello, world!"]
    tokens = emb.tokenize(prompts)
    assert torch.equal(tokens, open_clip.tokenize(prompts))
    m = emb.model
    with torch.no_grad():
        # Manual reference from the open_clip model's own modules.
        x = m.token_embedding(tokens) + m.positional_embedding
        batch_first = getattr(m.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        for block in m.transformer.resblocks[:-1]:
            x = block(x, attn_mask=m.attn_mask)
        x = x if batch_first else x.permute(1, 0, 2)
        expected = m.ln_final(x)
        out = emb(prompts)
        assert out.shape == (2, 77, 32)
        torch.testing.assert_close(out, expected)

        # "last" agrees with open_clip's own encode_text after EOS pooling + projection.
        last = FrozenOpenCLIPEmbedder(layer="last", model_config=TINY_OPENCLIP)
        last.load_state_dict(emb.state_dict())
        feats = last.encode(prompts)
        assert not torch.allclose(feats, out)
        pooled = feats[torch.arange(2), tokens.argmax(dim=-1)] @ last.model.text_projection
        torch.testing.assert_close(pooled, last.model.encode_text(tokens))


def test_openclip_embedder_full_meta_build() -> None:
    with torch.device("meta"):
        emb = FrozenOpenCLIPEmbedder(layer="penultimate")
    state = emb.state_dict()
    assert len(state) == 294
    assert sum(p.numel() for p in emb.parameters()) == 354_032_641
    assert all(_OPENCLIP_KEY.fullmatch(k) for k in state)
    assert state["model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert emb.device.type == "meta"


# ---------------------------------------------------------------- errors and ClassEmbedder


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_errors_name_the_fix() -> None:
    msg = _one_line_error(FrozenCLIPEmbedder, layer="second_last", text_config=TINY_HF)
    assert "second_last" in msg and "penultimate" in msg and "pooled" in msg
    msg = _one_line_error(FrozenCLIPEmbedder, "my/clip-model")
    assert "my/clip-model" in msg and "openai/clip-vit-large-patch14" in msg and "text_config" in msg
    msg = _one_line_error(FrozenCLIPEmbedder, layer="hidden", layer_idx=7, text_config=TINY_HF)
    assert "layer_idx" in msg and "[-3, 2]" in msg
    msg = _one_line_error(FrozenCLIPEmbedder, layer="hidden", text_config=TINY_HF)
    assert "layer_idx" in msg
    msg = _one_line_error(FrozenOpenCLIPEmbedder, layer="pooled", model_config=TINY_OPENCLIP)
    assert "pooled" in msg and "penultimate" in msg
    msg = _one_line_error(CLIPTokenizer, max_length=1)
    assert "max_length" in msg


def test_class_embedder() -> None:
    emb = ClassEmbedder(embed_dim=8, n_classes=10, ucg_rate=1.0)
    batch = {"class": torch.tensor([1, 2, 3])}
    emb.eval()
    out = emb(batch)
    assert out.shape == (3, 1, 8)
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[[1, 2, 3]])
    emb.train()  # ucg_rate=1: every label is dropped to the null (last) class
    torch.testing.assert_close(emb(batch)[:, 0], emb.embedding.weight[[9, 9, 9]])
    torch.testing.assert_close(emb(batch, disable_dropout=True), out)
    uc = emb.get_unconditional_conditioning(2)
    assert uc["class"].tolist() == [9, 9]
    assert emb({"label": torch.tensor([4])}, key="label").shape == (1, 1, 8)


def test_long_prompts_are_chunked_not_truncated() -> None:
    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder(text_config=TINY_HF)
    short = "a photo of a cat"
    long = ", ".join(f"a very detailed photo number {i} of a fluffy cat sitting on a red sofa" for i in range(12))
    n_tokens = len(emb.tokenizer.encode(long))
    assert n_tokens > 150
    # Prompts that fit are encoded exactly as before (one plain 77-token window).
    plain = emb.encode_tokens(emb.tokenize([short]))
    torch.testing.assert_close(emb([short]), plain, rtol=0, atol=0)
    out = emb([short, long])
    chunks = -(-n_tokens // 75)
    assert out.shape == (2, 77 * chunks, 32)
    # The short prompt's first window is unchanged; later windows are empty-prompt windows.
    torch.testing.assert_close(out[:1, :77], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1, 77:154], emb.encode_tokens(emb.tokenize([""])), rtol=1e-5, atol=1e-5)
    # The tail of the long prompt matters (it was not dropped).
    cut = emb([long.rsplit(",", 1)[0]])
    assert cut.shape[1] <= out.shape[1] and not torch.allclose(out[1:, -77:], cut[:, -77:])
