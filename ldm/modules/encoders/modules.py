"""Conditioning encoders: frozen CLIP / OpenCLIP text encoders and a class embedder.

Both text encoders are built from architecture tables only (never downloading weights), so the
real weights come from an SD checkpoint's ``cond_stage_model.*`` entries. Their state-dict layouts
match the CompVis (SD 1.x) and Stability (SD 2.x) code exactly so those checkpoints load as-is.
"""
from __future__ import annotations

import copy

from typing import Any, Sequence

import open_clip
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel

from ldm.modules.encoders.prompt_weights import BREAK, apply_weights, chunk_weighted, parse_prompt, window_rows
from ldm.modules.encoders.tokenizer import CLIPTokenizer, chunked_ids, clip_tokenizer


class AbstractEncoder(nn.Module):
    """Base class for conditioning encoders."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class TextEncoder(AbstractEncoder):
    """What the CLIP-style text encoders share: device following, freezing, tokenizing, ``encode``."""

    tokenizer: Any  # ours (OpenCLIP side) or transformers' CLIPTokenizer (CLIP side)

    @property
    def device(self) -> torch.device:
        """Where the weights are: inputs always follow them."""
        return _module_device(self)

    @device.setter
    def device(self, value: Any) -> None:
        # CompVis / SD 2 scripts assign it (``model.cond_stage_model.device = "cpu"``) after moving the model;
        # the value is checked and recorded, but tokens still go where the weights are, so they can never disagree.
        self.__dict__["requested_device"] = torch.device(value)

    def freeze(self) -> None:
        """Eval mode and no gradients for every parameter."""
        _freeze(self)

    def tokenize(self, text: str | Sequence[str]) -> torch.LongTensor:
        return self.tokenizer(text)

    def chunked_tokens(self, text: str | Sequence[str], min_chunks: int = 1) -> torch.LongTensor:
        """``[B, n_chunks, max_length]`` ids with every token kept (see :func:`encode_long`)."""
        if self.custom_tokens():
            return self.weighted_tokens(text, min_chunks)[0]
        return self.tokenizer.chunked(text, min_chunks=min_chunks)

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        return self(text)

    # ---- prompt weighting and textual-inversion tokens ---------------------------------------------------
    # ``prompt_weighting``: read AUTOMATIC1111's "(word:1.2)" syntax (switched per call by
    # ``prompt_weights.prompt_weighting``); ``token_expansions``: first id of a multi-vector textual-inversion
    # token -> all its ids (``ldm.textual_inversion``). With neither, prompts take the plain path, unchanged.
    prompt_weighting: bool = False

    @property
    def token_expansions(self) -> dict[int, list[int]]:
        return self.__dict__.setdefault("_token_expansions", {})

    def custom_tokens(self) -> bool:
        """Whether prompts go through :meth:`weighted_tokens` (weighting on, or multi-vector tokens loaded)."""
        return bool(self.prompt_weighting or self.token_expansions)

    def special_ids(self) -> tuple[int, int, int]:
        """(BOS, EOS, padding) ids."""
        raise NotImplementedError

    def bpe_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS / EOS (added tokens included, not expanded)."""
        raise NotImplementedError

    def text_ids(self, text: str) -> list[int]:
        """:meth:`bpe_ids` with each multi-vector token expanded into all its ids."""
        expansions = self.token_expansions
        ids = self.bpe_ids(text)
        if not expansions:
            return ids
        return [j for i in ids for j in expansions.get(i, (i,))]

    def weighted_tokens(self, text: str | Sequence[str], min_chunks: int = 1) -> tuple[torch.LongTensor, torch.Tensor]:
        """``[B, n_chunks, max_length]`` ids and per-token weights: the prompt's weighting syntax parsed (when
        ``prompt_weighting``), BREAK starting a new window, multi-vector tokens expanded."""
        texts = [text] if isinstance(text, str) else list(text)
        per_text = []
        for t in texts:
            fragments = parse_prompt(t) if self.prompt_weighting else [(t, 1.0)]
            pieces = [None if f is BREAK else (self.text_ids(f[0]), f[1]) for f in fragments]
            per_text.append(chunk_weighted(pieces, self.max_length - 2))
        return window_rows(per_text, self.max_length, *self.special_ids(), min_chunks=min_chunks)

    def first_window(self, text: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` ids of each prompt's first 77-token window (what pooled outputs read)."""
        return self.weighted_tokens(text)[0][:, 0] if self.custom_tokens() else self.tokenize(text)

    def token_embedding(self) -> nn.Embedding:
        """The token embedding table the transformer reads."""
        raise NotImplementedError

    def set_token_embedding(self, embedding: nn.Embedding) -> None:
        raise NotImplementedError

    def add_tokenizer_tokens(self, names: Sequence[str]) -> list[int]:
        """Add whole-word tokens to the tokenizer; their ids."""
        raise NotImplementedError

    def has_token(self, name: str) -> bool:
        """Whether the tokenizer already knows ``name`` as one token."""
        raise NotImplementedError


def encode_long(encoder: Any, text: str | Sequence[str], min_chunks: int = 1) -> torch.Tensor:
    """Prompts of any length: each 75-token chunk is encoded as its own 77-token window and the
    windows' features are concatenated, ``[B, n_chunks * 77, width]``. A prompt that fits is one
    window, identical to plain encoding; shorter prompts in a batch get empty windows appended.
    """
    if encoder.custom_tokens():  # weighting syntax / multi-vector tokens: each token's features times its weight
        tokens, weights = encoder.weighted_tokens(text, min_chunks=min_chunks)
        b, n, length = tokens.shape
        feats = apply_weights(encoder.encode_tokens(tokens.reshape(b * n, length)), weights.reshape(b * n, length))
        return feats.reshape(b, n * feats.shape[1], feats.shape[2])
    tokens = encoder.chunked_tokens(text, min_chunks=min_chunks)
    b, n, length = tokens.shape
    feats = encoder.encode_tokens(tokens.reshape(b * n, length))
    return feats.reshape(b, n * feats.shape[1], feats.shape[2])


def _module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter (inputs must follow the weights, wherever they were moved)."""
    return next(module.parameters()).device


def _freeze(module: nn.Module) -> None:
    module.eval()
    for param in module.parameters():
        param.requires_grad = False


# Architecture of the text towers of the known OpenAI CLIP releases; the ids match the tokenizer.
_CLIP_TEXT_BASE: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=CLIPTokenizer.bos_id, eos_token_id=CLIPTokenizer.eos_id, pad_token_id=CLIPTokenizer.eos_id,
)
KNOWN_CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    ),
    "openai/clip-vit-base-patch32": dict(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8, projection_dim=512,
    ),
}


class CLIPTextTransformer(CLIPTextModel):
    """A ``transformers.CLIPTextModel`` that holds the text tower at ``.text_model``, as transformers 4.x built it
    and as official files name it (``cond_stage_model.transformer.text_model.*``): module names, parameter names
    and state-dict keys agree. transformers 5 flattened ``CLIPTextModel``; here its tower is nested again and
    the model API (``forward``, ``get_input_embeddings``, ``resize_token_embeddings``, ``config``) delegates to it.
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        CLIPPreTrainedModel.__init__(self, config)  # not CLIPTextModel.__init__: the tower is built once, below
        self.text_model = CLIPTextModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.text_model(*args, **kwargs)


def clip_text_model(config: CLIPTextConfig) -> CLIPTextModel:
    """transformers' ``CLIPTextModel`` with its tower at ``.text_model`` (transformers 4.x: the class itself)."""
    model = CLIPTextModel(config) if _CLIP_TEXT_MODEL_NESTS else CLIPTextTransformer(config)
    return model


_CLIP_TEXT_MODEL_NESTS = "text_model" in CLIPTextModel.__init__.__code__.co_names


class FrozenCLIPEmbedder(TextEncoder):
    """OpenAI CLIP text encoder (SD 1.x; SD 2.x-style ``layer`` selection) returning token features."""

    LAYERS = ("last", "pooled", "hidden", "penultimate")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        text_config: dict[str, Any] | None = None,
        always_return_pooled: bool = False,
    ) -> None:
        super().__init__()
        del device  # kept for config compatibility; inputs follow the parameters' device instead
        if layer not in self.LAYERS:
            raise ValueError(f"FrozenCLIPEmbedder: layer must be one of {self.LAYERS}, got {layer!r}")
        self.return_pooled = always_return_pooled
        if version not in KNOWN_CLIP_TEXT_CONFIGS and text_config is None:
            raise ValueError(
                f"FrozenCLIPEmbedder: unknown version {version!r}; known: {sorted(KNOWN_CLIP_TEXT_CONFIGS)}, "
                "or pass text_config={...CLIPTextConfig fields, e.g. hidden_size, num_hidden_layers...}"
            )
        fields = {**_CLIP_TEXT_BASE, **KNOWN_CLIP_TEXT_CONFIGS.get(version, {}), **(text_config or {})}
        config = CLIPTextConfig(**fields)
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"FrozenCLIPEmbedder: max_length={max_length} exceeds the model's "
                f"{config.max_position_embeddings} positions; use max_length<={config.max_position_embeddings}"
            )
        if layer == "penultimate":  # clip-skip 2 shorthand
            layer, layer_idx = "hidden", -2
        if layer == "hidden":
            # hidden_states holds the embeddings plus one entry per layer: num_layers + 1 items.
            n = config.num_hidden_layers
            if not isinstance(layer_idx, int) or not -(n + 1) <= layer_idx <= n:
                raise ValueError(
                    f"FrozenCLIPEmbedder: layer='hidden' needs an int layer_idx in [{-(n + 1)}, {n}] "
                    f"(index into hidden_states), got {layer_idx!r}"
                )
        self.version = version
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.tokenizer = clip_tokenizer(max_length)  # transformers' CLIPTokenizer (pads with EOS), made offline
        self.transformer = clip_text_model(config)
        if freeze:
            self.freeze()

    def tokenize(self, text: str | Sequence[str]) -> torch.LongTensor:
        """``[B, max_length]`` ids as CompVis makes them: truncated, padded to ``max_length``."""
        texts = [text] if isinstance(text, str) else list(text)
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, padding="max_length",
                              return_tensors="pt")["input_ids"]

    def chunked_tokens(self, text: str | Sequence[str], min_chunks: int = 1) -> torch.LongTensor:
        if self.custom_tokens():
            return self.weighted_tokens(text, min_chunks)[0]
        return chunked_ids(self.tokenizer, text, self.max_length, min_chunks)

    def special_ids(self) -> tuple[int, int, int]:
        return self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

    def bpe_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.get_input_embeddings()

    def set_token_embedding(self, embedding: nn.Embedding) -> None:
        self.transformer.set_input_embeddings(embedding)
        self.transformer.config.vocab_size = embedding.num_embeddings

    def add_tokenizer_tokens(self, names: Sequence[str]) -> list[int]:
        self.tokenizer.add_tokens(list(names))
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(list(names))]

    def has_token(self, name: str) -> bool:
        return name in self.tokenizer.get_vocab()

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features for already tokenized ``[B, max_length]`` ids."""
        out = self.transformer(input_ids=tokens.to(self.device), output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]  # no final layer norm, as in Stability's SD 2 code

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """``[B, 77 * n_chunks, width]`` features (``[B, 1, width]`` for ``layer='pooled'``).

        Prompts longer than 75 tokens are encoded in chunks (see :func:`encode_long`), not truncated.
        """
        if self.layer == "pooled":
            return self.encode_tokens(self.first_window(text))
        z = encode_long(self, text)
        if self.return_pooled:  # sgm's always_return_pooled: the final-normed end-of-text token
            return z, self.transformer(input_ids=self.first_window(text).to(self.device)).pooler_output
        return z



# open_clip always builds the image tower too; it is deleted right away, so build a minimal
# one instead of e.g. ViT-H's 630M parameters. Text weights are unaffected.
_TINY_VISION_CFG: dict[str, Any] = dict(image_size=14, patch_size=14, layers=1, width=64, head_width=64)


class FrozenOpenCLIPEmbedder(TextEncoder):
    """OpenCLIP text encoder as used by SD 2.x (keys ``model.*``, text tower only)."""

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: Any = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        model_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        del device  # kept for config compatibility; inputs follow the parameters' device instead
        if layer not in self.LAYERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder: layer must be one of {self.LAYERS}, got {layer!r}")
        # model_config entries (embed_dim, text_cfg, vision_cfg, ...) replace the arch's whole entries.
        overrides = {"vision_cfg": _TINY_VISION_CFG, **(model_config or {})}
        # Build the architecture class directly: never downloads (``version`` is recorded only) and,
        # unlike create_model, never moves the model, so meta / empty_init builds stay unmaterialised.
        base = open_clip.get_model_config(arch)
        if base is None:
            raise ValueError(f"FrozenOpenCLIPEmbedder: unknown open_clip arch {arch!r}; use e.g. 'ViT-H-14' or 'ViT-bigG-14'")
        cfg = {**copy.deepcopy(base), **overrides}
        if cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {}):
            raise ValueError(f"FrozenOpenCLIPEmbedder: arch {arch!r} has a custom text tower; use a standard CLIP arch")
        model = open_clip.CLIP(**cfg)
        del model.visual
        self.model = model
        if max_length > model.positional_embedding.shape[0]:
            raise ValueError(
                f"FrozenOpenCLIPEmbedder: max_length={max_length} exceeds the model's "
                f"{model.positional_embedding.shape[0]} positions; lower max_length"
            )
        self.arch, self.version = arch, version
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)  # number of final resblocks to skip
        self.tokenizer = CLIPTokenizer(max_length, pad_with_eos=False)
        if freeze:
            self.freeze()

    def text_transformer_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run all resblocks except the last ``layer_idx`` ones (x in the transformer's own layout)."""
        blocks = self.model.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=attn_mask)
        return x

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, width]`` features for ``[B, L]`` token ids."""
        m = self.model
        n = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:n]
        # Older open_clip transformers are sequence-first; newer ones batch-first.
        batch_first = getattr(m.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        attn_mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        x = self.text_transformer_forward(x, attn_mask=attn_mask)
        if not batch_first:
            x = x.permute(1, 0, 2)
        return m.ln_final(x)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_with_transformer(tokens.to(self.device))

    def special_ids(self) -> tuple[int, int, int]:
        return self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id

    def bpe_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def set_token_embedding(self, embedding: nn.Embedding) -> None:
        self.model.token_embedding = embedding
        self.model.vocab_size = embedding.num_embeddings

    def add_tokenizer_tokens(self, names: Sequence[str]) -> list[int]:
        return self.tokenizer.add_tokens(names)

    def has_token(self, name: str) -> bool:
        return self.tokenizer.has_token(name)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """``[B, 77 * n_chunks, width]``: long prompts are encoded in chunks (see :func:`encode_long`)."""
        return encode_long(self, text)



class ClassEmbedder(nn.Module):
    """Class-label embedding for class-conditional models; the last class is the "null" class."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.1) -> None:
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.ucg_rate = ucg_rate
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: dict[str, torch.Tensor], key: str | None = None,
                disable_dropout: bool = False) -> torch.Tensor:
        """``[B, 1, embed_dim]`` embeddings of ``batch[key]``."""
        c = batch[key or self.key].to(self.embedding.weight.device).long()
        if self.training and self.ucg_rate > 0 and not disable_dropout:
            # Unconditional-guidance dropout: swap a random subset to the null class.
            drop = torch.rand(c.shape, device=c.device) < self.ucg_rate
            c = torch.where(drop, torch.full_like(c, self.n_classes - 1), c)
        return self.embedding(c[:, None])

    def get_unconditional_conditioning(self, bs: int, device: Any = None) -> dict[str, torch.Tensor]:
        """A batch dict of ``bs`` null-class labels, ready for :meth:`forward`."""
        device = self.embedding.weight.device if device is None else device
        return {self.key: torch.full((bs,), self.n_classes - 1, dtype=torch.long, device=device)}


def __getattr__(name: str) -> Any:
    # SDXL's embedders live in sdxl.py; published configs name them here (sgm's module path).
    if name in ("FrozenOpenCLIPEmbedder2", "ConcatTimestepEmbedderND"):
        from ldm.modules.encoders import sdxl

        return getattr(sdxl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
