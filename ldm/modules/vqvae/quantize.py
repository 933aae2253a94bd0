"""``VectorQuantizer2``: nearest-codebook quantization with a straight-through gradient (VQ-VAE, VQGAN).

Every position of ``z`` [B, C, H, W] (``C == e_dim``) is replaced by its nearest row of the codebook
``embedding.weight`` [n_e, e_dim] (squared Euclidean distance). With ``sg`` = stop-gradient:

    legacy=True  (taming's default):  loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    legacy=False (the VQ-VAE paper):  loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)

The term in ``z`` commits the encoder to its codes, the term in ``z_q`` moves the codebook. The
published CompVis/taming checkpoints were trained with ``legacy=True`` (beta on the codebook term).
The output ``z + sg[z_q - z]`` equals ``z_q`` and passes its gradient to ``z`` unchanged.

Constructor, parameter name (``embedding.weight``) and return values follow
``taming.modules.vqvae.quantize.VectorQuantizer2``, so CompVis VQ checkpoints load as they are.
``forward`` returns ``(z_q, loss, (perplexity, min_encodings, indices))``; taming's VectorQuantizer2
leaves perplexity as None, here it is the (detached) codebook perplexity of the batch;
``min_encodings`` (a one-hot [positions, n_e] matrix: gigabytes for large codebooks) stays None.

``remap`` names a ``.npy`` file of the codebook rows in use (integers); indices are then reported
among those rows only (``unknown_index``: "random", "extra" or a fixed index for codes outside it).
The file is read with ``allow_pickle=False``: only a plain integer array is accepted.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

UnknownIndex = Union[str, int]


def codebook_perplexity(indices: torch.Tensor, n_e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(entropy)`` of the code histogram of ``indices`` (1 = one code used, ``n_e`` = all equally),
    and the number of codes used; both detached float tensors."""
    counts = torch.bincount(indices.detach().reshape(-1).long(), minlength=n_e).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs + 1e-10)).sum()
    return entropy.exp(), (counts > 0).sum().float()


def load_used_indices(path: Union[str, os.PathLike], n_e: int) -> np.ndarray:
    """The 1-D integer array of codebook rows in a ``remap`` ``.npy`` file, checked against ``n_e``."""
    try:
        used = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"remap: cannot read {str(path)!r} as a plain .npy integer array ({first}); "
                         "give the used-codes file saved with numpy.save, or remap: null") from None
    if used.ndim != 1 or used.size == 0 or not np.issubdtype(used.dtype, np.integer):
        raise ValueError(f"remap: {str(path)!r} holds a {used.dtype} array of shape {used.shape}; "
                         "it must be a non-empty 1-D integer array of codebook indices")
    if used.min() < 0 or used.max() >= n_e:
        raise ValueError(f"remap: {str(path)!r} names codes outside [0, {n_e}); it was made for another codebook")
    return used.astype(np.int64)


class VectorQuantizer2(nn.Module):
    """Nearest-codebook quantizer (taming's ``VectorQuantizer2``; the module doc has the loss)."""

    def __init__(self, n_e: int, e_dim: int, beta: float, remap: Optional[str] = None,
                 unknown_index: UnknownIndex = "random", sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        if int(n_e) < 1 or int(e_dim) < 1:
            raise ValueError(f"VectorQuantizer2 needs n_e >= 1 and e_dim >= 1, got n_e={n_e}, e_dim={e_dim}")
        self.n_e, self.e_dim, self.beta, self.legacy = int(n_e), int(e_dim), float(beta), bool(legacy)
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        self.remap = remap
        self.re_embed = self.n_e
        self.unknown_index: UnknownIndex = unknown_index
        if remap is not None:
            self._init_remap(remap, unknown_index)

    def _init_remap(self, remap: str, unknown_index: UnknownIndex) -> None:
        used = load_used_indices(remap, self.n_e)
        self.register_buffer("used", torch.from_numpy(used))
        first = np.unique(used, return_index=True)[1]  # a code listed twice maps to its first position
        table = np.full(self.n_e, -1, dtype=np.int64)
        table[used[first]] = first
        self.register_buffer("_remap_table", torch.from_numpy(table), persistent=False)
        self.re_embed = len(used)
        if unknown_index == "extra":
            self.unknown_index = self.re_embed
            self.re_embed += 1
        elif unknown_index != "random" and not isinstance(unknown_index, int):
            raise ValueError(f"unknown_index must be 'random', 'extra' or an integer, got {unknown_index!r}")

    # ---- remapped indices -------------------------------------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, ...] -> positions in ``used``; codes not in it get ``unknown_index``."""
        new = self._remap_table.to(inds.device)[inds.long()]
        unknown = new < 0
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, (int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = int(self.unknown_index)
        return new

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` -> codebook indices (the "extra" index decodes as code ``used[0]``)."""
        inds = inds.long().clone()
        inds[inds >= self.used.shape[0]] = 0
        return self.used.to(inds.device)[inds]

    # ---- quantization -----------------------------------------------------------------------
    def nearest_codes(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of ``z_flat`` [N, e_dim] (fp32 distances)."""
        z32, codebook = z_flat.float(), self.embedding.weight.float()
        distances = (z32.square().sum(1, keepdim=True) + codebook.square().sum(1)
                     - 2 * z32 @ codebook.t())
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor, temp: Optional[float] = None, rescale_logits: bool = False,
                return_logits: bool = False):
        """``(z_q, loss, (perplexity, None, indices))`` for ``z`` [B, e_dim, H, W]; ``indices`` is flat
        [B*H*W] ([B, H, W] with ``sane_index_shape``; [B*H*W, 1] with ``remap``, as in taming)."""
        if (temp is not None and temp != 1.0) or rescale_logits or return_logits:
            raise ValueError("VectorQuantizer2 is deterministic: temp, rescale_logits and return_logits "
                             "are not supported (leave them at their defaults)")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer2 expects [B, {self.e_dim}, H, W] latents, got {tuple(z.shape)}")
        z_bhwc = z.permute(0, 2, 3, 1).contiguous()
        indices = self.nearest_codes(z_bhwc.view(-1, self.e_dim))
        z_q = self.embedding(indices).view(z_bhwc.shape).to(z.dtype)
        commitment = torch.mean((z_q.detach() - z_bhwc) ** 2)
        codebook = torch.mean((z_q - z_bhwc.detach()) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook
        else:
            loss = self.beta * commitment + codebook
        z_q = z_bhwc + (z_q - z_bhwc).detach()  # straight-through: the value of z_q, the gradient of z
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        perplexity, _ = codebook_perplexity(indices, self.n_e)
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z.shape[0], z.shape[2], z.shape[3])
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """Codebook rows of ``indices``; with ``shape`` = (batch, height, width, channel) as [B, C, H, W]."""
        if self.remap is not None:
            if shape is None:
                raise ValueError("get_codebook_entry with remap needs shape=(batch, height, width, channel)")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices.long())
        if shape is not None:
            z_q = z_q.view(*shape).permute(0, 3, 1, 2).contiguous()
        return z_q


VectorQuantizer = VectorQuantizer2
