"""Sample quality for the digits experiment: does an independent classifier see the asked-for digit?

The classifier is a logistic regression on scikit-learn's real 8x8 digit scans (independent of
the diffusion model); generated images are reduced to 8x8 grey levels on the same 0..16 scale.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_prompt(d: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[d]}"


@lru_cache(maxsize=1)
def digit_classifier():
    """Logistic regression trained on all 1797 scikit-learn digit scans (8x8, values 0..16)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=5000, C=0.5).fit(digits.data, digits.target)


def to_digit_features(images: torch.Tensor) -> np.ndarray:
    """Images [B, C, H, W] in [0, 1] -> [B, 64] on the scans' 0..16 scale (mean over channels, area-downsampled)."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(grey, (8, 8))
    return (small.clamp(0, 1) * 16).reshape(images.shape[0], -1).cpu().numpy()


def digit_accuracy(images: torch.Tensor, labels: Sequence[int]) -> float:
    pred = digit_classifier().predict(to_digit_features(images))
    return float(np.mean(pred == np.asarray(labels)))


@torch.no_grad()
def evaluate_digits(model: torch.nn.Module, per_digit: int = 10, seed: int = 0, **generate_kwargs) -> dict:
    """Generate ``per_digit`` samples for every digit and score them; returns accuracy and per-digit accuracy."""
    from ldm.generation import generate

    labels = [d for d in range(10) for _ in range(per_digit)]
    prompts = [digit_prompt(d) for d in labels]
    seeds = [seed + i for i in range(len(prompts))]
    images = generate(model, prompts, seeds=seeds, progress=False, batch_invariant=False, **generate_kwargs)
    pred = digit_classifier().predict(to_digit_features(images))
    per = {DIGIT_NAMES[d]: float(np.mean(pred[np.asarray(labels) == d] == d)) for d in range(10)}
    return {"digit_accuracy": float(np.mean(pred == np.asarray(labels))), "per_digit": per, "images": images, "labels": labels}
