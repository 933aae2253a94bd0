"""What code written against the CompVis / SD 2 ``ldm`` package calls: their imports, classes and signatures."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/tiny-sd1.yaml"


@pytest.fixture(scope="module")
def tiny():
    from ldm.api import build_model

    torch.manual_seed(0)
    return build_model(TINY)


def test_models_are_pytorch_lightning_modules_and_train_under_its_trainer(tiny, tmp_path):
    """CompVis' main.py and its forks import ``pytorch_lightning``: our models must be its LightningModules."""
    import pytorch_lightning as pl

    from ldm.api import build_model
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.models.diffusion.engine import DiffusionEngine

    for cls in (LatentDiffusion, AutoencoderKL, DiffusionEngine):
        assert issubclass(cls, pl.LightningModule), cls
    model = build_model(TINY)
    model.learning_rate = 1e-3
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    batch = {"image": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": ["a red square", "a blue circle"]}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_cond_stage_tokenizer_is_transformers_with_openai_ids():
    """The calls CompVis' FrozenCLIPEmbedder and the tools built on it make on ``cond_stage_model.tokenizer``."""
    import open_clip
    import transformers

    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    enc = FrozenCLIPEmbedder(version="tiny", text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                              num_attention_heads=2))
    tok = enc.tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerBase) and isinstance(enc.transformer, transformers.CLIPTextModel)
    assert tok.model_max_length == 77 and len(tok) == 49408
    assert tok("a cat")["input_ids"] == [49406, 320, 2368, 49407]
    assert tok.convert_tokens_to_ids("cat</w>") == 2368
    prompts = ["a photo of a cat", "Hello, world! A red house; 2 dogs?", "  spaces   and\ttabs ", "naïve café déjà-vu",
               "emoji 🐱 and ünïcödé", "UPPER lower MiXeD 12345", "a " * 100, "",
               "don't won't it's we're they've I'm you'll he'd"]
    batch = tok(prompts, truncation=True, max_length=77, return_length=True, return_overflowing_tokens=False,
                padding="max_length", return_tensors="pt")["input_ids"]
    reference = open_clip.tokenize(prompts)  # OpenAI's ids, padded with 0 and ending in EOS when truncated
    for row, ref in zip(batch, reference):
        n = int((ref != 0).sum())
        assert row[:n].tolist() == ref[:n].tolist()
        assert (row[n:] == 49407).all()  # SD 1.x pads with EOS
    assert torch.equal(enc.tokenize(prompts), batch)
    # Literal special tokens in a prompt are the special ids, as in OpenAI's reference tokenizer (which our own
    # OpenCLIP-side tokenizer follows; open_clip's spells its specials differently and reads them as text).
    from ldm.modules.encoders.tokenizer import CLIPTokenizer

    specials = ["<|startoftext|> literal specials <|endoftext|>", *prompts]
    assert torch.equal(CLIPTokenizer()(specials), tok(specials, truncation=True, max_length=77, padding="max_length",
                                                      return_tensors="pt")["input_ids"])
    enc.device = "cpu"  # SD 2's txt2img --device cpu
    assert enc.device == torch.device("cpu")


def test_textual_inversion_trains_only_the_new_token_row():
    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model(TINY)
    enc = model.cond_stage_model
    assert enc.tokenizer.add_tokens(["<cat-toy>"]) == 1
    enc.transformer.resize_token_embeddings(len(enc.tokenizer))
    new_id = enc.tokenizer.convert_tokens_to_ids("<cat-toy>")
    embeddings = enc.transformer.get_input_embeddings()
    assert new_id == 49408 and embeddings.weight.shape[0] == 49409
    toy = enc.tokenizer("toy", add_special_tokens=False)["input_ids"]
    assert enc.tokenizer("a <cat-toy> toy")["input_ids"] == [49406, 320, new_id, *toy, 49407]
    plain_before = model.get_learned_conditioning(["a red toy"]).detach()
    new_before = model.get_learned_conditioning(["a <cat-toy> toy"]).detach()
    weights = embeddings.weight
    before = weights.detach().clone()
    weights.requires_grad_(True)
    optimizer = torch.optim.SGD([weights], lr=10.0)
    for _ in range(3):
        optimizer.zero_grad()
        model.get_learned_conditioning(["a <cat-toy> toy"]).pow(2).mean().backward()
        weights.grad[:new_id] = 0  # textual inversion: only the new row learns
        optimizer.step()
    changed = (weights.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [new_id]
    with torch.no_grad():
        assert torch.equal(model.get_learned_conditioning(["a red toy"]), plain_before)
        assert not torch.allclose(model.get_learned_conditioning(["a <cat-toy> toy"]), new_before)
    # The new row is saved and loaded with the checkpoint's usual key.
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert model.state_dict()[key].shape[0] == 49409
