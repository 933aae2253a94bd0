"""Textual inversion: new prompt tokens whose embedding vectors were learned from images.

Reading (``--embedding FILE[:token]``, :func:`load_embeddings`): AUTOMATIC1111's ``.pt`` (``string_to_param``
-> ``{'*': [n, dim]}``, read with ``torch.load(weights_only=True)`` only) and ``.safetensors`` (``emb_params``),
diffusers' ``learned_embeds.safetensors`` / ``.bin`` (``{token: [n, dim]}``) and SDXL pairs (``clip_l`` and
``clip_g``). The token (default: the file's stem) joins each text encoder's tokenizer and its vectors are
appended to the token embedding table; existing rows are never touched. A token of n vectors becomes n
tokens (``tok``, ``tok_1``, ... as diffusers names them), all placed where the prompt says ``tok``.

Writing (:func:`save_embedding`): ``.pt`` in AUTOMATIC1111's layout (plain tensors and dicts, so
``weights_only`` loaders and diffusers' ``load_textual_inversion`` read it) and ``.safetensors`` in diffusers'
``{token: [n, dim]}`` layout, which AUTOMATIC1111 reads too; an SDXL pair as ``clip_l`` / ``clip_g``.

Training (:class:`TrainableTokens`): new tokens of a frozen text encoder whose vectors live in a parameter of
their own, substituted for the new ids by a hook on the embedding table, which itself never changes.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ldm.files import atomic_output

SUFFIXES = (".pt", ".bin", ".safetensors")
# Which key of an SDXL pair a text encoder takes: OpenAI CLIP (transformers) -> clip_l, OpenCLIP -> clip_g.
PAIR_KEYS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """A textual-inversion file that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class Embedding:
    """The vectors of one file: ``{"": [n, dim]}``, or ``{"clip_l": ..., "clip_g": ...}`` (SDXL)."""

    path: Path
    vectors: dict[str, torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


# ---- files ---------------------------------------------------------------------------------------------
def split_specs(text: Optional[str]) -> list[str]:
    """The ``FILE[:token]`` entries of the ``embeddings`` setting (``;``-separated; blanks ignored)."""
    return [part.strip() for part in (text or "").split(";") if part.strip()]


def parse_spec(spec: str) -> tuple[Path, Optional[str]]:
    """``FILE[:token]`` -> (file, token or None). A path that exists as given never loses a colon."""
    path, colon, token = spec.rpartition(":")
    if not colon or Path(spec).exists() or not path or "/" in token or "\\" in token:
        return Path(spec).expanduser(), None
    if not token.strip():
        raise EmbeddingError(f"embedding {spec!r}: empty token after ':'; write FILE or FILE:token")
    return Path(path).expanduser(), token


def default_token(path: Union[str, Path]) -> str:
    """The token a file's embedding is used under by default: its stem (``my-cat.pt`` -> ``my-cat``)."""
    return Path(path).stem


def read_embedding(path: Union[str, Path]) -> Embedding:
    """The vectors of a textual-inversion file (see the module doc); every problem is one line."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file {str(path)!r} not found")
    data = _read_safetensors(path) if path.suffix.lower() == ".safetensors" else _read_pickle(path)
    return Embedding(path, _vectors(path, data))


def _read_safetensors(path: Path) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise EmbeddingError(f"{path}: not a readable .safetensors file ({_first_line(err)})") from None


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # garbage bytes (invalid load key, truncated), not a pickle that wants to run code
            raise EmbeddingError(f"{path}: not a readable .pt/.bin embedding (a damaged or foreign file)") from None
        raise EmbeddingError(f"{path}: holds pickled Python objects ({found.group(1)}) that only full unpickling would build, "
                             "which runs code from the file; refused (convert it to .safetensors where you trust it)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise EmbeddingError(f"{path}: not a readable .pt/.bin embedding ({_first_line(err)})") from None


def _first_line(err: BaseException, limit: int = 120) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:limit]


def _vectors(path: Path, data: Any) -> dict[str, torch.Tensor]:
    def checked(name: str, value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() not in (1, 2) \
                or value.numel() == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise EmbeddingError(f"{path}: {name} is not a [vectors, width] float tensor (got {shape})")
        return (value[None] if value.dim() == 1 else value).detach().float().contiguous()

    if isinstance(data, torch.Tensor):  # a bare tensor (torch.save(vectors))
        return {"": checked("the tensor", data)}
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path}: holds a {type(data).__name__}, not an embedding (expected a dict of tensors)")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param must hold exactly one tensor, got "
                                 f"{len(params) if isinstance(params, dict) else type(params).__name__}")
        return {"": checked("string_to_param", next(iter(params.values())))}
    if all(k in data for k in PAIR_KEYS):  # SDXL (AUTOMATIC1111 / kohya)
        pair = {k: checked(k, data[k]) for k in PAIR_KEYS}
        if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise EmbeddingError(f"{path}: clip_l has {pair['clip_l'].shape[0]} vectors but clip_g "
                                 f"{pair['clip_g'].shape[0]}; they must match")
        return pair
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers {token: tensor}, kohya / AUTOMATIC1111 safetensors {"emb_params": tensor}
        return {"": checked(repr(next(iter(tensors))), next(iter(tensors.values())))}
    keys = ", ".join(sorted(map(str, data)))[:120]
    raise EmbeddingError(f"{path}: not a textual-inversion embedding (expected string_to_param, clip_l + clip_g, "
                         f"or a single tensor; found {keys or 'nothing'})")


def save_embedding(path: Union[str, Path], token: str, vectors: Union[torch.Tensor, dict[str, torch.Tensor]],
                   step: Optional[int] = None) -> Path:
    """Write ``vectors`` (``[n, dim]``, or an SDXL ``{"clip_l", "clip_g"}`` pair) as ``.pt`` (AUTOMATIC1111's
    layout) or ``.safetensors`` (diffusers' ``{token: vectors}``), by the file's suffix; atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(vectors, dict):
        if set(vectors) != set(PAIR_KEYS):
            raise ValueError(f"an embedding pair needs exactly {PAIR_KEYS}, got {sorted(vectors)}")
        tensors = {k: vectors[k].detach().float().cpu().contiguous().clone() for k in PAIR_KEYS}
    else:
        tensors = {"": vectors.detach().float().cpu().contiguous().clone()}
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: write an embedding as .pt or .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        if suffix == ".safetensors":
            save_file(tensors if "" not in tensors else {token: tensors[""]}, str(tmp), metadata={"name": token})
        else:  # .pt / .bin
            if "" in tensors:
                data: dict[str, Any] = {
                    "string_to_token": {"*": 265},  # CLIP's id of "*", as AUTOMATIC1111 writes it
                    "string_to_param": {"*": tensors[""]},
                    "name": token, "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None,
                }
            else:  # AUTOMATIC1111 reads an SDXL pair as a dict of exactly these tensors
                data = tensors
            torch.save(data, tmp)
    return path


# ---- tokens in text encoders ------------------------------------------------------------------------------
def token_names(token: str, n: int) -> list[str]:
    """The tokens of an n-vector embedding: ``token``, ``token_1``, ... (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def describe(encoder: nn.Module, index: int) -> str:
    width = encoder.token_embedding().embedding_dim
    return f"text encoder {index + 1} ({type(encoder).__name__}, {width}-wide token embeddings)"


def add_tokens(encoder: nn.Module, token: str, n: int, *, source: str) -> list[int]:
    """Add ``token`` (n vectors: n tokens) to ``encoder``'s tokenizer; their ids, which are the rows right after
    the embedding table's last. Existing vocabulary entries are refused (they would change other prompts)."""
    for name in token_names(token, n):
        if encoder.has_token(name):
            raise EmbeddingError(f"{source}: token {name!r} is already in the tokenizer's vocabulary; load it under "
                                 "another token: FILE:<new-token>")
    first = encoder.token_embedding().num_embeddings
    ids = encoder.add_tokenizer_tokens(token_names(token, n))
    if ids != list(range(first, first + n)):
        raise RuntimeError(f"{source}: the tokenizer gave ids {ids} for {token!r}, not the rows {first}.. after the "
                           "embedding table; tokenizer and table disagree in size")
    if n > 1:
        encoder.token_expansions[ids[0]] = ids
    return ids


def append_rows(encoder: nn.Module, rows: torch.Tensor) -> None:
    """A new embedding table: the old rows, unchanged, then ``rows`` (same dtype, device, trainability)."""
    old = encoder.token_embedding()
    weight = torch.cat([old.weight.detach(), rows.to(device=old.weight.device, dtype=old.weight.dtype)])
    new = nn.Embedding.from_pretrained(weight, freeze=not old.weight.requires_grad, padding_idx=old.padding_idx)
    encoder.set_token_embedding(new)


def _pick(embedding: Embedding, encoder: nn.Module, index: int, count: int) -> torch.Tensor:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    where = describe(encoder, index)
    if "" in embedding.vectors:
        if count > 1:
            raise EmbeddingError(f"{embedding.path}: one set of vectors, but this model has {count} text encoders; "
                                 "an SDXL embedding holds clip_l and clip_g")
        vectors = embedding.vectors[""]
    else:
        vectors = embedding.vectors[PAIR_KEYS[0] if isinstance(encoder, FrozenCLIPEmbedder) else PAIR_KEYS[1]]
    width = encoder.token_embedding().embedding_dim
    if vectors.shape[1] != width:
        raise EmbeddingError(f"{embedding.path}: {vectors.shape[1]}-wide vectors do not fit {where}; "
                             "the embedding was made for another model")
    return vectors


def model_text_encoders(model: nn.Module) -> list[nn.Module]:
    """A model's text encoders in conditioning order (SDXL: CLIP-L, then OpenCLIP bigG)."""
    from ldm.modules.encoders.prompt_weights import text_encoders

    return text_encoders([model])


def load_embeddings(models: Union[nn.Module, Iterable[Optional[nn.Module]]],
                    specs: Sequence[Union[str, tuple[Union[str, Path], Optional[str]]]]) -> Callable[[], None]:
    """Make each ``FILE[:token]`` of ``specs`` a prompt token of ``models`` (an SDXL base and its refiner may share
    a text encoder: it gets the token once). Returns a function that puts the tokenizers and embedding tables
    back as they were (the tables are new modules: the old ones are untouched meanwhile)."""
    models = [models] if isinstance(models, nn.Module) else [m for m in models if m is not None]
    loaded = [(read_embedding(path), token or default_token(path))
              for path, token in (parse_spec(s) if isinstance(s, str) else (Path(s[0]), s[1]) for s in specs)]
    undo: list[Callable[[], None]] = []
    done: set[int] = set()
    try:
        for model in models:
            encoders = model_text_encoders(model)
            for index, encoder in enumerate(encoders):
                if id(encoder) in done:
                    continue
                done.add(id(encoder))
                if loaded:
                    undo.append(_snapshot(encoder))
                for embedding, token in loaded:
                    vectors = _pick(embedding, encoder, index, len(encoders))
                    add_tokens(encoder, token, len(vectors), source=str(embedding.path))
                    append_rows(encoder, vectors)
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise

    def restore_all() -> None:
        for restore in reversed(undo):
            restore()
        undo.clear()

    return restore_all


def _snapshot(encoder: nn.Module) -> Callable[[], None]:
    """Give ``encoder`` its own tokenizer copy; the returned function puts back tokenizer, table and expansions."""
    import copy

    tokenizer, table, expansions = encoder.tokenizer, encoder.token_embedding(), dict(encoder.token_expansions)
    encoder.tokenizer = copy.deepcopy(tokenizer)

    def restore() -> None:
        encoder.tokenizer = tokenizer
        encoder.set_token_embedding(table)
        encoder.token_expansions.clear()
        encoder.token_expansions.update(expansions)

    return restore


# ---- training ---------------------------------------------------------------------------------------------
class TrainableTokens(nn.Module):
    """``num_vectors`` new tokens of a frozen text encoder whose vectors train in :attr:`vectors`.

    The encoder's embedding table is not extended or written: a pre-hook maps the new ids to row 0 for the
    lookup and a hook puts :attr:`vectors` in their place, so every existing row stays bit-identical and
    gradients reach only the new vectors. They start as the embedding of ``init_word`` (its tokens spread
    over the vectors, as AUTOMATIC1111 does)."""

    def __init__(self, encoder: nn.Module, token: str, init_word: str, num_vectors: int = 1) -> None:
        super().__init__()
        if num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
        table = encoder.token_embedding()
        init_ids = encoder.bpe_ids(init_word)
        if not init_ids:
            raise ValueError(f"init_word {init_word!r} has no tokens; give a word such as 'cat'")
        with torch.no_grad():
            rows = table.weight[torch.tensor(init_ids, device=table.weight.device)].float().cpu()
        init = torch.stack([rows[i * len(rows) // num_vectors] for i in range(num_vectors)])
        self.token, self.first_id = token, table.num_embeddings
        self.ids = add_tokens(encoder, token, num_vectors, source=f"placeholder {token!r}")
        self.vectors = nn.Parameter(init.clone())
        self.__dict__["encoder"] = encoder  # not a submodule: its weights belong to the model
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = [table.register_forward_pre_hook(self._lookup_old_rows),
                         table.register_forward_hook(self._put_new_rows)]

    def _lookup_old_rows(self, module: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        new = ids >= self.first_id
        self._pending.append((ids, new))
        return (ids.masked_fill(new, 0), *args[1:])

    def _put_new_rows(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ids, new = self._pending.pop()
        if not bool(new.any()):
            return output
        rows = self.vectors[(ids - self.first_id).clamp(0, len(self.vectors) - 1)]
        return torch.where(new[..., None], rows.to(output.dtype), output)

    def remove(self) -> None:
        """Unhook the embedding table (the tokenizer keeps the tokens)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def exported(self) -> torch.Tensor:
        """The learned vectors, ``[num_vectors, dim]`` float32 on the CPU."""
        return self.vectors.detach().float().cpu().clone()
