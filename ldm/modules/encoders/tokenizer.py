"""Offline CLIP tokenizer producing exactly OpenAI CLIP's token ids.

The BPE vocabulary and merges come from the file shipped inside the ``open_clip`` package
(``bpe_simple_vocab_16e6.txt.gz``), so nothing is ever downloaded. Text cleaning (ftfy, html
unescape, whitespace collapse, lowercase) and the pre-tokenisation regex follow OpenAI's
reference implementation, including treating literal ``<|startoftext|>`` / ``<|endoftext|>``
in the prompt as the special tokens (open_clip spells them differently).
"""
from __future__ import annotations

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

    @property
    def chunk_size(self) -> int:
        """Number of content tokens that fit between BOS and EOS."""
        return self.max_length - 2

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without BOS/EOS, after CLIP's cleaning and lowercasing."""
        text = whitespace_clean(basic_clean(text)).lower()
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
        return self._tok.decode(keep).strip()

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
