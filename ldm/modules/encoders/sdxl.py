"""SDXL's embedders (sgm names; re-exported from ``ldm.modules.encoders.modules``).

* :class:`FrozenOpenCLIPEmbedder2`: OpenCLIP (ViT-bigG for SDXL) returning the penultimate
  layer's token features *without* the final layer norm (``legacy: False``) and, with
  ``always_return_pooled``, the pooled text embedding: the final-normed end-of-text token
  projected by ``text_projection``.
* :class:`ConcatTimestepEmbedderND`: micro-conditioning; every scalar of ``[B, N]`` (sizes, crop
  offsets, aesthetic score) embedded sinusoidally to ``outdim`` and concatenated, ``[B, N * outdim]``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", device: Any = None,
                 max_length: int = 77, freeze: bool = True, layer: str = "last", always_return_pooled: bool = False,
                 legacy: bool = True, model_config: dict[str, Any] | None = None) -> None:
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze, layer=layer,
                         model_config=model_config)
        if always_return_pooled and legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2: always_return_pooled needs legacy: False (as SDXL's configs set)")
        self.return_pooled, self.legacy = always_return_pooled, legacy

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.legacy:
            return super().encode_with_transformer(tokens)
        return self._hidden_and_last(tokens)[0]

    def _hidden_and_last(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features of the chosen layer, un-normed; the last layer's output, final-normed)."""
        m = self.model
        n = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:n]
        batch_first = getattr(m.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        attn_mask = m.attn_mask[:n, :n] if m.attn_mask is not None else None
        blocks = m.transformer.resblocks
        chosen = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - self.layer_idx:
                chosen = x
            x = block(x, attn_mask=attn_mask)
        chosen = x if chosen is None else chosen
        if not batch_first:
            x, chosen = x.permute(1, 0, 2), chosen.permute(1, 0, 2)
        return chosen, m.ln_final(x)

    def pooled(self, text: str | Sequence[str]) -> torch.Tensor:
        """``[B, width]``: the end-of-text token of the (first 77-token window of the) prompt, projected; never
        weighted (as AUTOMATIC1111), though read from the same tokens as the weighted features."""
        tokens = self.first_window(text).to(self.device)
        _, last = self._hidden_and_last(tokens)
        # The first end-of-text token (the highest id of the base vocabulary, but added tokens come after it).
        eot = last[torch.arange(last.shape[0]), (tokens == self.tokenizer.eos_id).int().argmax(dim=-1)]
        return eot @ self.model.text_projection

    def forward(self, text: str | Sequence[str]) -> Any:
        z = super().forward(text)
        return (z, self.pooled(text)) if self.return_pooled else z


class ConcatTimestepEmbedderND(nn.Module):
    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        x = x[:, None] if x.dim() == 1 else x
        if x.dim() != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects [B, N] values (e.g. sizes), got shape {tuple(x.shape)}")
        b, n = x.shape
        emb = timestep_embedding(x.reshape(b * n).float(), self.outdim)
        return emb.reshape(b, n * self.outdim)
