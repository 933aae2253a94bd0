"""Textual inversion: AUTOMATIC1111 / diffusers / SDXL files as prompt tokens, one-line errors, training only the new
rows, our exported files in diffusers' load_textual_inversion, --embedding in the scripts' recipe, and a real run
on the digits demo model that teaches a new token a digit."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.api import build_model
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import CLIPTokenizer, clip_tokenizer
from ldm.textual_inversion import (EmbeddingError, TrainableTokens, load_embeddings, parse_spec, read_embedding,
                                   save_embedding)
from tests.helpers import random_model

CONFIG = "configs/tiny/tiny-sd1.yaml"
V = 49408  # CLIP's vocabulary: new tokens get the ids from here on


@pytest.fixture(scope="module")
def base():
    return random_model(CONFIG, unet_seed=2, text_seed=1)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def width(model) -> int:
    return model.cond_stage_model.token_embedding().embedding_dim


def vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def write_layouts(folder, dim: int) -> dict:
    """One file per layout we read, each holding known vectors."""
    v = {k: vectors(n, dim, seed=i) for i, (k, n) in enumerate([("a1111_pt", 2), ("a1111_st", 1), ("diffusers_st", 3),
                                                                  ("diffusers_bin", 1), ("bare", 2)])}
    files = {
        "a1111_pt": folder / "a1111.pt", "a1111_st": folder / "kohya.safetensors",
        "diffusers_st": folder / "learned_embeds.safetensors", "diffusers_bin": folder / "learned_embeds.bin",
        "bare": folder / "bare.pt",
    }
    # AUTOMATIC1111 keeps the vectors as a tensor that requires grad; torch.save pickles it as a Parameter here.
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": nn.Parameter(v["a1111_pt"])}, "name": "x",
                "step": 1500, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, files["a1111_pt"])
    save_file({"emb_params": v["a1111_st"]}, str(files["a1111_st"]))
    save_file({"<concept>": v["diffusers_st"]}, str(files["diffusers_st"]))
    torch.save({"<concept>": v["diffusers_bin"][0]}, files["diffusers_bin"])  # 1-D: one vector
    torch.save(v["bare"], files["bare"])
    return {k: (files[k], v[k]) for k in files}


def test_reads_every_layout(tmp_path):
    for name, (path, expected) in write_layouts(tmp_path, 8).items():
        got = read_embedding(path).vectors
        assert list(got) == [""] and torch.equal(got[""], expected), name
    pair = {"clip_l": vectors(2, 8), "clip_g": vectors(2, 12, seed=1)}
    save_file(pair, str(tmp_path / "sdxl.safetensors"))
    got = read_embedding(tmp_path / "sdxl.safetensors").vectors
    assert set(got) == {"clip_l", "clip_g"} and all(torch.equal(got[k], pair[k]) for k in pair)


def test_spec_and_default_token(tmp_path):
    (tmp_path / "odd:name.pt").write_bytes(b"")
    assert parse_spec("emb/my-cat.pt") == (tmp_path.__class__("emb/my-cat.pt"), None)
    assert parse_spec("emb/my-cat.pt:<cat>")[1] == "<cat>"
    assert parse_spec(str(tmp_path / "odd:name.pt")) == (tmp_path / "odd:name.pt", None)  # an existing path keeps its colon


def test_loaded_tokens_add_rows_and_leave_everything_else_alone(model, tmp_path):
    enc = model.cond_stage_model
    dim = width(model)
    v = vectors(3, dim)
    save_embedding(tmp_path / "my-thing.pt", "my-thing", v)
    plain = ["a photo of a cat", "a fox " * 40]
    table = enc.token_embedding()
    with torch.no_grad():
        before = model.get_learned_conditioning(plain)
    old_rows = table.weight.detach().clone()
    restore = load_embeddings(model, [str(tmp_path / "my-thing.pt")])  # default token: the file's stem
    new_table = enc.token_embedding()
    assert new_table.num_embeddings == V + 3 and torch.equal(new_table.weight[:V], old_rows)
    assert torch.equal(new_table.weight[V:], v)
    # One token in the prompt stands for its three vectors (any case, as transformers matches added tokens).
    tokens = enc.chunked_tokens(["a My-Thing cat"])[0, 0, :7].tolist()
    assert tokens == [49406, 320, V, V + 1, V + 2, 2368, 49407]
    with torch.no_grad():
        assert torch.equal(model.get_learned_conditioning(plain), before)
        got = model.get_learned_conditioning(["a my-thing cat"])[0]
        row = torch.tensor([tokens + [49407] * 70])
        assert torch.equal(got, enc.encode_tokens(row)[0])
    restore()
    assert enc.token_embedding() is table and len(enc.tokenizer) == V
    assert enc.chunked_tokens(["a my-thing"])[0, 0, 2].item() < V  # plain BPE again


def test_tokens_work_with_prompt_weighting_and_the_token_option(model, tmp_path):
    from ldm.modules.encoders.prompt_weights import prompt_weighting

    enc = model.cond_stage_model
    save_embedding(tmp_path / "file.safetensors", "ignored", vectors(2, width(model)))
    restore = load_embeddings(model, [f"{tmp_path / 'file.safetensors'}:<tok>"])
    with prompt_weighting(model):
        ids, weights = enc.weighted_tokens(["a (<tok>:1.5) cat"])
    assert ids[0, 0, 1:5].tolist() == [320, V, V + 1, 2368]
    assert weights[0, 0, 1:5].tolist() == [1.0, 1.5, 1.5, 1.0]
    restore()


def test_openclip_tokenizer_adds_tokens_like_transformers():
    ours, hf = CLIPTokenizer(), clip_tokenizer()
    assert ours.add_tokens(["<My-Cat>", "<My-Cat>_1"]) == [V, V + 1]
    hf.add_tokens(["<My-Cat>", "<My-Cat>_1"])
    for text in ["a photo of <my-cat> <my-cat>_1, please", "A<MY-CAT>b", "no token here", "<my-cat><my-cat>_1"]:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert ours.has_token("<my-cat>") and ours.has_token("cat") and not ours.has_token("<other>")
    assert ours.decode(ours.encode("a <my-cat> cat")) == "a <my-cat> cat"
    assert copy.deepcopy(ours)._added == ours._added and CLIPTokenizer().encode("<my-cat>") != [V]


def test_openclip_encoder_loads_tokens(tmp_path):
    torch.manual_seed(0)
    enc = FrozenOpenCLIPEmbedder(model_config=dict(embed_dim=16, text_cfg=dict(context_length=77, vocab_size=V,
                                                                                width=32, heads=2, layers=2)))
    v = vectors(2, 32)
    save_embedding(tmp_path / "tok.pt", "tok", v)
    restore = load_embeddings(enc, [f"{tmp_path / 'tok.pt'}:<tok>"])
    assert torch.equal(enc.token_embedding().weight[V:], v)
    assert enc.chunked_tokens(["a <tok>"])[0, 0, :5].tolist() == [49406, 320, V, V + 1, 49407]
    restore()
    assert enc.token_embedding().num_embeddings == V and enc.tokenizer.encode("<tok>")[0] < V


def test_sdxl_pair_goes_to_both_encoders(tmp_path):
    torch.manual_seed(0)
    model = build_model("configs/tiny/tiny-sdxl.yaml").eval()
    clip, bigg = model.conditioner.text_encoders()
    pair = {"clip_l": vectors(2, 32), "clip_g": vectors(2, 32, seed=1)}
    save_embedding(tmp_path / "my-xl.safetensors", "my-xl", pair)
    assert set(read_embedding(tmp_path / "my-xl.safetensors").vectors) == {"clip_l", "clip_g"}
    restore = load_embeddings(model, [str(tmp_path / "my-xl.safetensors")])
    assert torch.equal(clip.token_embedding().weight[V:], pair["clip_l"])
    assert torch.equal(bigg.token_embedding().weight[V:], pair["clip_g"])
    batch = {"txt": ["an my-xl fox"], "original_size_as_tuple": torch.tensor([[64, 64]]),
             "crop_coords_top_left": torch.tensor([[0, 0]]), "target_size_as_tuple": torch.tensor([[64, 64]])}
    with torch.no_grad():
        out = model.conditioner(batch)
        pooled_tokens = bigg.first_window(["an my-xl fox"])[0].tolist()
    an, fox = bigg.tokenizer.encode("an"), bigg.tokenizer.encode("fox")
    assert out["crossattn"].shape == (1, 77, 64) and pooled_tokens[:6] == [49406, *an, V, V + 1, *fox, 49407]
    restore()
    save_embedding(tmp_path / "sd1.pt", "sd1", vectors(1, 32))
    with pytest.raises(EmbeddingError, match="one set of vectors, but this model has 2 text encoders"):
        load_embeddings(model, [str(tmp_path / "sd1.pt")])
    assert clip.token_embedding().num_embeddings == V and bigg.token_embedding().num_embeddings == V  # undone


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_bad_files_give_one_line(model, tmp_path):
    bad = tmp_path / "objects.pt"
    torch.save({"string_to_param": nn.ParameterDict({"*": nn.Parameter(torch.zeros(1, 8))})}, bad)
    with pytest.raises(EmbeddingError) as err:
        read_embedding(bad)
    assert "full unpickling" in one_line(err) and "objects.pt" in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    save_file({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, str(tmp_path / "two.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(2, 2, 2)}}, tmp_path / "shape.pt")
    for name, words in [("junk.pt", "not a readable"), ("junk.safetensors", "not a readable"),
                        ("two.safetensors", "not a textual-inversion embedding"), ("shape.pt", "[vectors, width]"),
                        ("missing.pt", "not found")]:
        with pytest.raises(EmbeddingError) as err:
            read_embedding(tmp_path / name)
        assert words in one_line(err) and name in str(err.value)
    save_embedding(tmp_path / "wide.pt", "wide", vectors(1, width(model) + 1))
    with pytest.raises(EmbeddingError) as err:
        load_embeddings(model, [str(tmp_path / "wide.pt")])
    assert "wide.pt" in one_line(err) and "text encoder 1 (FrozenCLIPEmbedder" in str(err.value)
    save_embedding(tmp_path / "cat.pt", "cat", vectors(1, width(model)))
    with pytest.raises(EmbeddingError) as err:
        load_embeddings(model, [str(tmp_path / "cat.pt")])
    assert "already in the tokenizer's vocabulary" in one_line(err)
    assert model.cond_stage_model.token_embedding().num_embeddings == V


def test_training_changes_only_the_new_vectors(model, tmp_path):
    enc = model.cond_stage_model
    table = enc.token_embedding()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = TrainableTokens(enc, "<new>", "dog", num_vectors=2)
    init = tokens.vectors.detach().clone()
    assert torch.equal(init[0], table.weight[enc.bpe_ids("dog")[0]])
    opt = torch.optim.AdamW([tokens.vectors], lr=0.1, weight_decay=0.01)
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(3):
        c = model.get_learned_conditioning(["a <new> on the grass", "a photo"])
        loss = model.model.diffusion_model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), c).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(tokens.vectors, init)
    after = model.state_dict()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen)  # every existing weight, bit for bit
    assert enc.token_embedding() is table and table.num_embeddings == V
    with torch.no_grad():
        trained = model.get_learned_conditioning(["a <new> on the grass"])
    # The same vectors loaded from an exported file give the same features.
    save_embedding(tmp_path / "new.safetensors", "<new>", tokens.exported())
    fresh = copy.deepcopy(model)
    tokens.remove()
    fresh_tokens = [m for m in fresh.modules() if isinstance(m, TrainableTokens)]
    assert not fresh_tokens  # TrainableTokens is not a submodule of the model here
    other = build_model(CONFIG).eval()
    other.load_state_dict(frozen)
    load_embeddings(other, [f"{tmp_path / 'new.safetensors'}:<new>"])
    with torch.no_grad():
        assert torch.equal(other.get_learned_conditioning(["a <new> on the grass"]), trained)


@pytest.mark.parametrize("suffix, n", [(".pt", 1), (".safetensors", 2)])
def test_diffusers_loads_our_files_and_matches(base, tmp_path, suffix, n):
    """Our export in diffusers' StableDiffusionPipeline.load_textual_inversion: same token rows, same images."""
    from benchmarks.peers import diffusers_sd1_pipeline
    from ldm.generation import generate

    # A copy: the pipeline's text encoder shares its config object, which load_textual_inversion resizes.
    pipe = diffusers_sd1_pipeline(copy.deepcopy(base), CONFIG, tmp_path)
    pipe.set_progress_bar_config(disable=True)
    v = vectors(n, width(base), seed=7)
    path = save_embedding(tmp_path / f"my-concept{suffix}", "<my-concept>", v)
    pipe.load_textual_inversion(str(path))
    names = ["<my-concept>"] + [f"<my-concept>_{i}" for i in range(1, n)]
    ids = pipe.tokenizer.convert_tokens_to_ids(names)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], v)
    model = copy.deepcopy(base)
    load_embeddings(model, [f"{path}:<my-concept>"])
    prompts, seeds = ["a <my-concept> on a hill"], [5]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    ref = pipe(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=5, latents=noise,
               output_type="pt").images
    ours = generate(model, prompts, seeds=seeds, height=32, width=32, steps=3, guidance_scale=5, progress=False)
    plain = generate(base, ["a on a hill"], seeds=seeds, height=32, width=32, steps=3, guidance_scale=5, progress=False)
    assert (ours - plain).abs().max() > 0.01  # the token matters ...
    assert (ours - ref).abs().max().item() < 1e-4  # ... and diffusers uses it exactly as we do


def test_txt2img_records_and_checks_embeddings(txt2img, model_args, tmp_path):
    import numpy as np
    from PIL import Image

    from ldm.files import sha256_file
    from ldm.image_io import read_metadata
    from ldm.run_config import translate_argv

    assert "embeddings='a.pt;b.pt:<b>'" in translate_argv("txt2img", ["--embedding", "a.pt", "--embedding", "b.pt:<b>"])
    emb = save_embedding(tmp_path / "my-style.pt", "my-style", vectors(2, 32))
    out = tmp_path / "out"
    argv = ["--prompt", "a my-style <style> cat", "--embedding", f"{emb}:<style>", "--embedding", str(emb), "--n_samples", "1",
            "--n_iter", "1", "--H", "16", "--W", "16", "--ddim_steps", "2", "--outdir", str(out), *model_args]
    assert txt2img.run(argv) == 0
    (png,) = (out / "samples").iterdir()
    meta = read_metadata(png)
    assert meta["embeddings"] == f"{emb}:<style>;{emb}" and meta["prompt_weighting"] is True
    assert meta["embeddings_sha256"] == [sha256_file(emb)] * 2
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(tmp_path / "again")]) == 0
    again = tmp_path / "again" / "samples" / "00000.png"
    assert read_metadata(again)["embeddings"] == meta["embeddings"]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))
    save_embedding(emb, "my-style", vectors(2, 32, seed=3))  # the file changes: the image cannot be reproduced
    assert txt2img.run(["--regenerate", str(png), "--outdir", str(tmp_path / "third")]) != 0
    (tmp_path / "bad.pt").write_bytes(b"junk")
    assert txt2img.run([*argv[:2], "--embedding", str(tmp_path / "bad.pt"), "--outdir", str(tmp_path / "x"),
                        *model_args]) != 0


@pytest.mark.slow
def test_digits_run_teaches_a_new_token_the_digit(tmp_path):
    """main.py experiment=textual_inversion_digits, shortened: '<my-seven>' starts as the unrelated word "house"
    (the demo model draws no 7 for it) and after 30 steps on the 7s the classifier reads 7 in its samples."""
    import os

    import numpy as np

    from ldm.api import load_model
    from ldm.digit_metrics import digit_classifier, to_digit_features
    from ldm.generation import generate
    from ldm.run_config import resolve_model
    from tests.helpers import run_main_py

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "run"
    res = run_main_py(["experiment=textual_inversion_digits", f"hydra.run.dir={run}", "progress_refresh=0",
                       "trainer.max_steps=30", "data.batch_size=16", "model.base_learning_rate=0.05"],
                      cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = run / "export" / "my-seven.pt"
    assert exported.is_file() and (run / "export" / "my-seven.safetensors").is_file()
    model = load_model(*resolve_model(None, None))
    table = model.cond_stage_model.token_embedding().weight.detach().clone()
    common = dict(seeds=list(range(20)), height=16, width=16, steps=10, guidance_scale=3.0, progress=False)

    def sevens(prompt: str) -> float:
        images = generate(model, [prompt] * 20, **common)
        return float(np.mean(digit_classifier().predict(to_digit_features(images)) == 7))

    before = sevens("a handwritten digit house")  # what '<my-seven>' was before training
    restore = load_embeddings(model, [f"{exported}:<my-seven>"])
    assert torch.equal(model.cond_stage_model.token_embedding().weight[:V], table)
    after = sevens("a handwritten digit <my-seven>")
    restore()
    print(json.dumps({"sevens_before": before, "sevens_after": after}))
    assert before <= 0.2 and after >= 0.8, (before, after)
