"""Textual inversion training: a ``LatentDiffusion`` that learns new prompt tokens and nothing else.

    python main.py experiment=textual_inversion data.root=my_images placeholder='<my-cat>' init_word=cat \\
        base_config=configs/stable-diffusion/v1-inference.yaml base_ckpt=v1-5-pruned-emaonly.safetensors

The base model (a config + weights file; by default the bundled demo model) is built and loaded as it is;
every one of its weights is frozen and stays bit-identical (the text encoder's embedding table included:
see :class:`ldm.textual_inversion.TrainableTokens`). Each training image gets a caption from ``templates``
with the placeholder, e.g. "a photo of a <my-cat>". At the end the learned vectors are written to
``<run>/export/<name>.pt`` (AUTOMATIC1111) and ``<name>.safetensors`` (diffusers' layout), which
``--embedding``, AUTOMATIC1111 and diffusers' ``load_textual_inversion`` read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.frozen_base import load_frozen_base
from ldm.textual_inversion import TrainableTokens, save_embedding
from ldm.util import ConfigError

DEFAULT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                     "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
                     "a good photo of a {}", "a photo of one {}", "a photo of the large {}")
class TextualInversionDiffusion(LatentDiffusion):
    """``placeholder`` (``num_vectors`` tokens, started from ``init_word``) learned on a frozen base model.

    ``config``/``ckpt``: the base model (a ``LatentDiffusion`` config such as SD 1.x / 2.x, and its weights);
    both None: the bundled demo model. ``export_dir``: where the embedding files go at the end of training
    (default ``<run>/export``)."""

    def __init__(self, placeholder: str, init_word: str, config: Optional[str] = None, ckpt: Optional[str] = None,
                 num_vectors: int = 1, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 export_dir: Optional[str] = None) -> None:
        templates = list(templates)
        if not templates or any("{}" not in t for t in templates):
            raise ConfigError(f"textual inversion: every template needs a {{}} for the placeholder, got {templates}")
        if not placeholder or not placeholder.strip():
            raise ConfigError("textual inversion: placeholder is empty; give the new token, e.g. placeholder='<my-cat>'")
        config_path, ckpt_path = load_frozen_base(self, config, ckpt, "textual inversion")
        encoder = self.cond_stage_model
        if not callable(getattr(encoder, "token_embedding", None)):
            raise ConfigError(f"textual inversion: the cond stage of {config_path} is not a CLIP/OpenCLIP text encoder")
        self.textual_inversion = TrainableTokens(encoder, placeholder, init_word, num_vectors)
        self.placeholder, self.templates = placeholder, templates
        self.export_dir = export_dir
        self.base_config, self.base_ckpt = config_path, ckpt_path

    def train(self, mode: bool = True) -> "TextualInversionDiffusion":
        super().train(mode)
        self.model.eval()  # frozen: no dropout noise in the UNet
        return self

    def captions(self, n: int) -> list[str]:
        """``n`` captions, each a random template with the placeholder."""
        picks = torch.randint(len(self.templates), (n,)).tolist()
        return [self.templates[i].format(self.placeholder) for i in picks]

    def shared_step(self, batch: dict, **kwargs: Any):
        images = batch[self.first_stage_key]
        return super().shared_step({**batch, self.cond_stage_key: self.captions(len(images))})

    def embedding_name(self) -> str:
        """The export files' stem: the placeholder without characters file names should not have."""
        return re.sub(r"[^\w.\- ]", "", self.placeholder).strip() or "embedding"

    def export(self, folder: Path, step: Optional[int] = None) -> list[Path]:
        """Write the learned vectors as ``<name>.pt`` (AUTOMATIC1111) and ``<name>.safetensors`` (diffusers)."""
        vectors = self.textual_inversion.exported()
        name = self.embedding_name()
        return [save_embedding(Path(folder) / f"{name}{suffix}", self.placeholder, vectors, step=step)
                for suffix in (".pt", ".safetensors")]

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = Path(self.export_dir) if self.export_dir else Path(self.trainer.default_root_dir) / "export"
            for path in self.export(folder, step=int(self.global_step)):
                print(f"textual inversion: wrote {path}")
