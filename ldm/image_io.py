"""Image files for generation: init images and masks in, PNGs with generation metadata out.

    init = load_image("photo.jpg", size=(512, 512))   # [1, 3, H, W] in [-1, 1]
    mask = load_mask("mask.png", size=(512, 512))     # [1, 1, H, W] in {0, 1}, white = repaint
    save_png(images[0], "out/00000.png", {"prompt": "a cat", "seed": 42})
    read_metadata("out/00000.png")["seed"]           # 42

PNGs carry two text chunks: ``ldm`` (JSON with every generation parameter, what regeneration
reads) and ``parameters`` (one human-readable line). Files are written atomically.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from ldm.files import atomic_write

PathLike = Union[str, os.PathLike]
Size = tuple[int, int]  # (height, width)
METADATA_KEY = "ldm"



def open_image(path: PathLike, what: str = "image") -> Image.Image:
    """The decoded image at ``path`` (EXIF orientation applied); one-line errors when missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} not found")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} is not a file")
    try:
        with Image.open(p) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot read {what} {str(p)!r}: {reason}") from None


# Single-channel modes deeper than 8 bits, with the value of white; convert("L"/"RGB") would clip them at 255.
_DEEP_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _unit_grey(img: Image.Image) -> Optional[Image.Image]:
    """A 16-bit / 32-bit / float grey image as mode "F" in [0, 1]; None for ordinary 8-bit modes."""
    white = _DEEP_GREY.get(img.mode)
    if white is None:
        return None
    values = np.clip(np.asarray(img, dtype=np.float32) / white, 0.0, 1.0)
    return Image.fromarray(values, mode="F")


def image_to_tensor(img: Image.Image, size: Optional[Size] = None) -> torch.Tensor:
    """A PIL image as RGB ``[1, 3, H, W]`` in [-1, 1], resized to ``size`` = (height, width) if given.

    16-bit grey images are scaled by their full range (not clipped at 255) and repeated to RGB."""
    grey = _unit_grey(img)
    if grey is not None:
        if size is not None and (grey.height, grey.width) != tuple(size):
            grey = grey.resize((size[1], size[0]), Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.clip(np.asarray(grey, dtype=np.float32), 0, 1) * 2.0 - 1.0)
        return x[None, None].expand(1, 3, -1, -1).contiguous()
    img = img.convert("RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1)[None].contiguous()


def mask_to_tensor(img: Image.Image, size: Optional[Size] = None) -> torch.Tensor:
    """A PIL mask as ``[1, 1, H, W]`` in {0, 1} (white = repaint), resized to ``size`` = (height, width) if given."""
    grey = _unit_grey(img)
    img = grey if grey is not None else img.convert("L")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    scale = 1.0 if grey is not None else 255.0
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / scale)
    return (x >= 0.5).float()[None, None]


def load_image(path: PathLike, size: Optional[Size] = None) -> torch.Tensor:
    """The image file at ``path`` as ``[1, 3, H, W]`` in [-1, 1] (see :func:`image_to_tensor`)."""
    return image_to_tensor(open_image(path, "init image"), size)


def load_mask(path: PathLike, size: Optional[Size] = None) -> torch.Tensor:
    """The mask file at ``path`` as ``[1, 1, H, W]`` in {0, 1} (see :func:`mask_to_tensor`)."""
    return mask_to_tensor(open_image(path, "mask"), size)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A ``[3, H, W]`` (or ``[1, 3, H, W]``) float image in [0, 1] as an 8-bit RGB PIL image."""
    if image.dim() == 4:
        image = image[0]
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


def format_parameters(metadata: Mapping[str, Any]) -> str:
    """One human-readable line of the main generation parameters."""
    m = metadata
    size = f"{m['width']}x{m['height']}" if m.get("width") and m.get("height") else None
    fields = [("Prompt", m.get("prompt")), ("Negative prompt", m.get("negative_prompt")), ("Steps", m.get("steps")),
              ("Sampler", m.get("sampler")), ("CFG scale", m.get("guidance_scale")), ("Seed", m.get("seed")),
              ("Size", size), ("Strength", m.get("strength")), ("Model hash", str(m.get("model_sha256") or "")[:10])]
    return ", ".join(f"{label}: {value}".replace("\n", " ") for label, value in fields if value not in (None, ""))


def save_png(image: Union[torch.Tensor, Image.Image], path: PathLike, metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``image`` as PNG at ``path`` atomically, with ``metadata`` in the ``ldm`` and ``parameters`` chunks."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    info = PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True))
        info.add_text("parameters", format_parameters(metadata))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=info)
    atomic_write(path, buffer.getvalue())
    return Path(path)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The ``ldm`` generation metadata of a PNG written by :func:`save_png`."""
    text = open_image(path, "image").info.get(METADATA_KEY)
    if text is None:
        raise ValueError(f"{str(path)!r} carries no ldm generation metadata; regenerate needs a PNG written by the ldm scripts")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ValueError(f"the ldm metadata of {str(path)!r} is not a JSON object; the file was altered")
    return data


def make_grid(images: torch.Tensor, n_rows: int, padding: int = 2) -> torch.Tensor:
    """Tile ``[N, 3, H, W]`` images into one ``[3, H', W']`` image, ``n_rows`` images per row (CompVis naming)."""
    n, c, h, w = images.shape
    per_row = max(1, min(n_rows, n))
    rows = -(-n // per_row)
    grid = images.new_zeros(c, rows * (h + padding) + padding, per_row * (w + padding) + padding)
    for i, image in enumerate(images):
        top, left = padding + (i // per_row) * (h + padding), padding + (i % per_row) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    return grid
