"""Offline CLIP tokenizer producing exactly OpenAI CLIP's token ids.

The BPE vocabulary and merges come from the file shipped inside the ``open_clip`` package
(``bpe_simple_vocab_16e6.txt.gz``), so nothing is ever downloaded. Text cleaning (ftfy, html
unescape, whitespace collapse, lowercase) and the pre-tokenisation regex follow OpenAI's
reference implementation, including treating literal ``<|startoftext|>`` / ``<|endoftext|>``
in the prompt as the special tokens (open_clip spells them differently).
"""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Sequence

import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, basic_clean, whitespace_clean

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# Same pattern as OpenAI CLIP: specials, English contractions, letter runs, single digits,
# and runs of other non-space characters.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    """One shared BPE table (loading the merges takes a noticeable fraction of a second)."""
    return SimpleTokenizer()


class CLIPTokenizer:
    """CLIP BPE tokenizer with fixed-length, BOS/EOS-wrapped output.

    ``pad_with_eos=True`` pads with the EOS id like SD 1.x (HF ``openai/clip-vit-large-patch14``);
    ``False`` pads with 0 like ``open_clip.tokenize`` (SD 2.x).
    """

    bos_id: int = 49406
    eos_id: int = 49407
    vocab_size: int = 49408

    def __init__(self, max_length: int = 77, pad_with_eos: bool = True) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 to hold BOS and EOS, got {max_length}")
        self.max_length = max_length
        self.pad_with_eos = pad_with_eos
        self.pad_id = self.eos_id if pad_with_eos else 0
        self._tok = _bpe()
        # Guard against a changed vocabulary file silently shifting every id.
        assert self._tok.sot_token_id == self.bos_id and self._tok.eot_token_id == self.eos_id
        self._special = {BOS_TOKEN: self.bos_id, EOS_TOKEN: self.eos_id}
        self._added: dict[str, int] = {}  # add_tokens: lower-cased token -> id
        self._added_pattern: regex.Pattern | None = None

    def __deepcopy__(self, memo: dict) -> "CLIPTokenizer":
        """A copy with its own added tokens (the BPE table stays shared: it never changes)."""
        new = copy.copy(self)
        new._added = dict(self._added)
        return new

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Whole tokens matched before BPE, as transformers' ``add_tokens`` does for CLIP: anywhere in the
        cleaned, lower-cased text, longest first; new ones get the next free ids. Returns each token's id."""
        ids = []
        for token in tokens:
            key = self._normal(token)
            if not key:
                raise ValueError(f"cannot add an empty token ({token!r})")
            if key not in self._added:
                self._added[key] = self.vocab_size + len(self._added)
            ids.append(self._added[key])
        ordered = sorted(self._added, key=len, reverse=True)
        self._added_pattern = regex.compile("|".join(regex.escape(t) for t in ordered)) if ordered else None
        return ids

    def has_token(self, token: str) -> bool:
        """Whether ``token`` is one token already: a vocabulary entry or an added token."""
        key = self._normal(token)
        return key in self._added or key in self._tok.encoder or key in self._special

    @staticmethod
    def _normal(text: str) -> str:
        return whitespace_clean(basic_clean(text)).lower()

    @property
    def chunk_size(self) -> int:
        """Number of content tokens that fit between BOS and EOS."""
        return self.max_length - 2

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS, after CLIP's cleaning and lowercasing (added tokens matched first)."""
        text = self._normal(text)
        if self._added_pattern is None or not self._added:
            return self._bpe_ids(text)
        ids: list[int] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            ids += self._bpe_ids(text[start : match.start()])
            ids.append(self._added[match.group(0)])
            start = match.end()
        return ids + self._bpe_ids(text[start:])

    def _bpe_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in _PATTERN.findall(text):
            if word in self._special:
                ids.append(self._special[word])
                continue
            # Byte-level: map each UTF-8 byte to a printable unicode char before BPE.
            word = "".join(self._tok.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self._tok.encoder[piece] for piece in self._tok.bpe(word).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, dropping BOS/EOS/padding."""
        keep = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, 0)]
        if not self._added:
            return self._tok.decode(keep).strip()
        names = {i: t for t, i in self._added.items()}
        parts, run = [], []
        for i in keep + [-1]:
            if i in names or i == -1:
                parts += [self._tok.decode(run).strip()] if run else []
                parts += [names[i]] if i in names else []
                run = []
            else:
                run.append(i)
        return " ".join(parts)

    def _row(self, ids: Sequence[int]) -> list[int]:
        """BOS + ids + EOS, padded to ``max_length`` (``ids`` must already fit)."""
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Token ids ``[B, max_length]``; long prompts keep BOS + first ``max_length-2`` + EOS."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self._row(self.encode(t)[: self.chunk_size]) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def chunked(self, texts: str | Sequence[str], min_chunks: int = 1) -> torch.LongTensor:
        """Token ids ``[B, n_chunks, max_length]`` with every token kept.

        Each prompt is split into ``max_length-2``-token chunks, each wrapped as BOS+chunk+EOS+pad.
        All prompts are padded to the same chunk count (at least ``min_chunks``) with empty chunks.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        per_text = []
        for text in texts:
            ids = self.encode(text)
            per_text.append([ids[i : i + self.chunk_size] for i in range(0, len(ids), self.chunk_size)])
        n_chunks = max([min_chunks, 1, *(len(c) for c in per_text)])
        rows = [[self._row(c) for c in chunks + [[]] * (n_chunks - len(chunks))] for chunks in per_text]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n_chunks, self.max_length)


# ---- transformers' CLIPTokenizer, built offline ------------------------------------------------------
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's BPE vocabulary (ids) and merge list, derived from the table open_clip ships."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return {v: i for i, v in enumerate(vocab)}, merges


@lru_cache(maxsize=1)
def _tokenizer_folder() -> str:
    """A folder with ``vocab.json`` + ``merges.txt`` (written once per user cache, atomically)."""
    import hashlib
    import json
    import os
    from pathlib import Path

    from open_clip.tokenizer import default_bpe

    from ldm.files import atomic_write

    digest = hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm")
    folder = root / f"clip-tokenizer-{digest}"
    if not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        vocab, merges = _vocab_and_merges()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable cache (read-only home): a private folder for this process
            import tempfile

            folder = Path(tempfile.mkdtemp(prefix="ldm-clip-tokenizer-"))
        atomic_write(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        atomic_write(folder / "vocab.json", json.dumps(vocab))
    return str(folder)


def clip_tokenizer(max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with exactly OpenAI's ids (``openai/clip-vit-large-patch14``'s: pads with
    EOS), made offline; each call builds its own (``add_tokens`` on one model never leaks to another; building
    costs about what a ``deepcopy`` of a cached one would)."""
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    tokenizer = HFCLIPTokenizer.from_pretrained(_tokenizer_folder(), pad_token=EOS_TOKEN, model_max_length=max_length,
                                                local_files_only=True)
    if tokenizer.bos_token_id != CLIPTokenizer.bos_id or tokenizer.eos_token_id != CLIPTokenizer.eos_id:
        raise RuntimeError("the CLIP vocabulary shipped with open_clip has changed: BOS/EOS ids moved")
    return tokenizer


def chunked_ids(tokenizer, texts: str | Sequence[str], max_length: int, min_chunks: int = 1) -> torch.LongTensor:
    """Token ids ``[B, n_chunks, max_length]`` of a transformers tokenizer, every token kept: each prompt split
    into ``max_length - 2``-token chunks, each wrapped BOS + chunk + EOS + padding; all prompts padded to the same
    chunk count (at least ``min_chunks``) with empty chunks."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    size = max_length - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    per_text = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        per_text.append([ids[i : i + size] for i in range(0, len(ids), size)])
    n_chunks = max([min_chunks, 1, *(len(c) for c in per_text)])

    def row(ids: list[int]) -> list[int]:
        return [bos, *ids, eos] + [pad] * (max_length - len(ids) - 2)

    rows = [[row(c) for c in chunks + [[]] * (n_chunks - len(chunks))] for chunks in per_text]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n_chunks, max_length)
