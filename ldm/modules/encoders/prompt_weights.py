"""Prompt weighting in AUTOMATIC1111's syntax, for every text encoder.

``(word)`` multiplies the attention to ``word`` by 1.1, ``((word))`` by 1.21, ``[word]`` divides it by 1.1,
``(word:1.3)`` sets the factor; factors of nested brackets multiply. ``\\(``, ``\\)``, ``\\[``, ``\\]`` and
``\\\\`` are the literal characters; an unclosed bracket reaches to the end of the prompt, a stray closing one
is text. ``BREAK`` (upper case, a word of its own) ends the current 75-token window: what follows starts a
new one.

:func:`parse_prompt` turns a prompt into ``(text, weight)`` fragments, :func:`chunk_weighted` lays their
tokens out in 75-token windows, and :func:`apply_weights` scales each token's output feature by its weight,
then restores the window's mean, as AUTOMATIC1111 does (``z * w``, then ``z *= mean_before / mean_after``).
The encoders do this only while :func:`prompt_weighting` switches them on (``generate`` does, per its
``prompt_weighting`` setting); a prompt without any of this syntax encodes bit for bit as without weighting.

Two deliberate differences from AUTOMATIC1111: the mean is restored per prompt (AUTOMATIC1111 takes it over
the whole batch, so a prompt's features depended on its batch mates), and ``BREAK`` inside brackets still
breaks (AUTOMATIC1111 then multiplied its marker and fed the word ``BREAK`` to the encoder).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

ROUND, SQUARE = 1.1, 1 / 1.1
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class Fragment(NamedTuple):
    """A run of prompt text and its weight; ``BREAK`` is ``("BREAK", -1.0)``, as AUTOMATIC1111 writes it."""

    text: str
    weight: float


BREAK = Fragment("BREAK", -1.0)


class _Piece:
    __slots__ = ("text", "weight", "is_break")

    def __init__(self, text: str, weight: float = 1.0, is_break: bool = False) -> None:
        self.text, self.weight, self.is_break = text, weight, is_break


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_prompt(text: str) -> list[Fragment]:
    """``text`` as weighted fragments, AUTOMATIC1111's ``parse_prompt_attention`` semantics: neighbours of
    equal weight merged, ``[("", 1.0)]`` for an empty prompt, :data:`BREAK` between windows.

    >>> parse_prompt("an (important) word")
    [Fragment(text='an ', weight=1.0), Fragment(text='important', weight=1.1), Fragment(text=' word', weight=1.0)]
    """
    pieces: list[_Piece] = []
    open_at: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece.is_break:
                piece.weight *= factor

    def add_text(run: str) -> None:
        for k, part in enumerate(_BREAK.split(run)):
            if k:
                pieces.append(_Piece("BREAK", -1.0, is_break=True))
            pieces.append(_Piece(part))

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":  # an escape; a backslash before anything else vanishes, as in AUTOMATIC1111
            literal = text[i + 1] if i + 1 < n and text[i + 1] in _ESCAPABLE else ""
            pieces.append(_Piece(literal))
            i += 1 + len(literal)
        elif c in "([":
            open_at[c].append(len(pieces))
            i += 1
        elif c == ":" and (m := _WEIGHT.match(text, i)) and _number(m.group(1)) is not None:
            if open_at["("]:
                scale(open_at["("].pop(), float(m.group(1)))
            else:  # no bracket to close: the whole ":1.3)" is text
                add_text(m.group(0))
            i = m.end()
        elif c == ")" and open_at["("]:
            scale(open_at["("].pop(), ROUND)
            i += 1
        elif c == "]" and open_at["["]:
            scale(open_at["["].pop(), SQUARE)
            i += 1
        elif c in _SPECIAL:  # a stray bracket or colon is text
            add_text(c)
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in open_at["("]:
        scale(start, ROUND)
    for start in open_at["["]:
        scale(start, SQUARE)
    merged: list[_Piece] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is not None and not last.is_break and not piece.is_break and last.weight == piece.weight:
            last.text += piece.text
        else:
            merged.append(piece)
    if not merged:
        return [Fragment("", 1.0)]
    return [BREAK if p.is_break else Fragment(p.text, p.weight) for p in merged]


# One window's content: token ids and their weights (without BOS / EOS / padding).
Window = tuple[list[int], list[float]]


def chunk_weighted(pieces: Iterable[Optional[tuple[Sequence[int], float]]], size: int) -> list[Window]:
    """Lay out ``(token ids, weight)`` pieces in windows of at most ``size`` tokens; ``None`` (a BREAK) closes
    the current window, even an empty one. Always at least one window. Without BREAKs this is exactly
    cutting the concatenated ids every ``size`` tokens."""
    windows: list[Window] = []
    ids: list[int] = []
    weights: list[float] = []
    for piece in pieces:
        if piece is None:
            windows.append((ids, weights))
            ids, weights = [], []
            continue
        tokens, weight = piece
        for token in tokens:
            if len(ids) == size:
                windows.append((ids, weights))
                ids, weights = [], []
            ids.append(int(token))
            weights.append(float(weight))
    if ids or not windows:
        windows.append((ids, weights))
    return windows


def window_rows(per_text: Sequence[list[Window]], max_length: int, bos: int, eos: int, pad: int,
                min_chunks: int = 1) -> tuple[torch.LongTensor, torch.Tensor]:
    """``[B, n_chunks, max_length]`` ids (BOS + window + EOS + padding) and their weights (1 outside the
    windows' tokens); every text padded to the same window count (at least ``min_chunks``) with empty ones."""
    n_chunks = max([min_chunks, 1, *(len(w) for w in per_text)])
    ids_rows, weight_rows = [], []
    for windows in per_text:
        windows = list(windows) + [([], [])] * (n_chunks - len(windows))
        for ids, weights in windows:
            fill = max_length - len(ids) - 2
            ids_rows.append([bos, *ids, eos] + [pad] * fill)
            weight_rows.append([1.0, *weights, 1.0] + [1.0] * fill)
    b = len(per_text)
    return (torch.tensor(ids_rows, dtype=torch.long).reshape(b, n_chunks, max_length),
            torch.tensor(weight_rows, dtype=torch.float32).reshape(b, n_chunks, max_length))


# A window whose mean is below this fraction of its mean magnitude keeps the plain products: e.g. a text encoder
# whose final layer norm has no bias (the randomly initialised demo encoder) gives features averaging to ~0,
# and "restoring" such a mean would divide by almost nothing.
NEGLIGIBLE_MEAN = 1e-4


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z`` ``[N, L, D]`` (one 77-token window per row) with each token's features times its weight ``[N, L]``,
    then rescaled so each row keeps its mean (in float32; see :data:`NEGLIGIBLE_MEAN`). Rows whose weights are
    all 1 are returned untouched, bit for bit."""
    w = weights.to(device=z.device, dtype=torch.float32)
    rows = (w != 1).any(dim=1)
    if not bool(rows.any()):
        return z
    zf = z[rows].float()
    before = zf.mean(dim=(1, 2), keepdim=True)
    scaled = zf * w[rows][..., None]
    after = scaled.mean(dim=(1, 2), keepdim=True)
    floor = NEGLIGIBLE_MEAN * scaled.abs().mean(dim=(1, 2), keepdim=True)
    usable = (before.abs() > floor) & (after.abs() > floor)
    ratio = torch.where(usable, before / torch.where(usable, after, torch.ones_like(after)), torch.ones_like(after))
    out = z.clone()
    out[rows] = (scaled * ratio).to(z.dtype)
    return out


def text_encoders(models: Iterable[Optional[nn.Module]]) -> list[nn.Module]:
    """Every text encoder (``ldm.modules.encoders.modules.TextEncoder``) inside ``models``."""
    from ldm.modules.encoders.modules import TextEncoder

    found: dict[int, nn.Module] = {}
    for model in models:
        if model is not None:
            found.update({id(m): m for m in model.modules() if isinstance(m, TextEncoder)})
    return list(found.values())


@contextmanager
def prompt_weighting(models: Union[nn.Module, Iterable[Optional[nn.Module]]], enabled: bool = True) -> Iterator[None]:
    """Within the block, the text encoders of ``models`` read prompts with (``enabled``) or without weighting
    syntax; afterwards each is as it was."""
    encoders = text_encoders([models] if isinstance(models, nn.Module) else models)
    saved = [(e, e.__dict__.get("prompt_weighting")) for e in encoders]
    for encoder in encoders:
        encoder.prompt_weighting = bool(enabled)
    try:
        yield
    finally:
        for encoder, value in saved:
            if value is None:
                encoder.__dict__.pop("prompt_weighting", None)
            else:
                encoder.prompt_weighting = value
