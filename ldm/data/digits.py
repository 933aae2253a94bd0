"""scikit-learn's bundled handwritten digits as a tiny text-to-image dataset.

1797 real 8x8 scans (values 0..16) ship inside scikit-learn, so this dataset needs no
download: useful for smoke-training a tiny latent-diffusion model end to end.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.image_folder import micro_conditioning

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "validation", "val", "all")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train, val) indices with ``val_fraction`` of every class in val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        # At least one per class when a val split is wanted, so every class is evaluated.
        n_val = max(1, int(round(len(idx) * val_fraction))) if val_fraction > 0 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(Dataset):
    """Items ``{"image": [size, size, 3] float32 in [-1, 1], "txt": str, "label": int}``."""

    def __init__(
        self,
        split: str = "train",
        size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        flip: bool = False,
        caption_template: str = "a handwritten digit {name}",
        only_digits: Sequence[int] | None = None,
    ) -> None:
        """``only_digits``: keep only scans of these digits (e.g. ``[7]`` for textual inversion of one class)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("DigitsDataset needs scikit-learn: pip install scikit-learn") from err

        digits = load_digits()
        labels = np.asarray(digits.target, dtype=np.int64)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed)
        indices = {"train": train_idx, "validation": val_idx, "val": val_idx}.get(split, np.arange(len(labels)))
        if only_digits is not None:
            wanted = sorted({int(d) for d in only_digits})
            if not wanted or any(not 0 <= d <= 9 for d in wanted):
                raise ValueError(f"only_digits must be a non-empty list of 0..9, got {list(only_digits)!r}")
            indices = indices[np.isin(labels[indices], wanted)]

        self.split, self.size, self.flip, self.caption_template = split, size, flip, caption_template
        self.indices = indices
        self.labels = labels[indices]
        # 1797 tiny images: preprocess once up front instead of per item.
        x = torch.from_numpy(digits.images[indices]).float()[:, None] / 16.0 * 2.0 - 1.0
        if size != x.shape[-1]:
            # Bilinear weights are convex, so the result stays within [-1, 1].
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x.clamp(-1.0, 1.0).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()

    def __len__(self) -> int:
        return len(self.indices)

    def caption(self, label: int) -> str:
        return self.caption_template.format(name=DIGIT_NAMES[label], label=label)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(1)  # width axis of [H, W, C]
        label = int(self.labels[i])
        return {"image": image.clone(), "txt": self.caption(label), "label": label,
                **micro_conditioning((8, 8), (0, 0), (self.size, self.size))}  # 8x8 scans, upsampled, never cropped
