"""A folder of captioned images (HF ``imagefolder`` layout or sidecar ``.txt`` captions).

Corrupt files are skipped, never fatal: a long fine-tuning run should not die at step
40k because one JPEG in a scraped folder is truncated.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What PIL raises for truncated, corrupt or hostile files.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def micro_conditioning(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> dict:
    """SDXL's per-image conditioning (diffusers' training convention): the source size (height, width)
    before resizing, the crop's (top, left) in the resized image, and the training size."""
    return {"original_size_as_tuple": torch.tensor(original), "crop_coords_top_left": torch.tensor(crop),
            "target_size_as_tuple": torch.tensor(target)}


def preprocess_image(
    image: Image.Image,
    size: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Resize the shorter side to ``size``, crop to a square, to float32 [size, size, 3] in [-1, 1]."""
    return preprocess_with_crop(image, size, center_crop, flip, generator)[0]


def preprocess_with_crop(
    image: Image.Image,
    size: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int, int]:
    """:func:`preprocess_image`, plus the crop's (top, left) in the resized image (after a flip: of the
    flipped image), the micro-conditioning SDXL was trained with."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = int(torch.randint(new_w - size + 1, (), generator=generator))
        top = int(torch.randint(new_h - size + 1, (), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1.0
    if flip:
        x = x.flip(1)  # width axis of [H, W, C]
        left = new_w - size - left
    return x, top, left


def _read_metadata(root: Path, caption_key: str) -> dict[str, str] | None:
    """Captions keyed by root-relative posix path from metadata.jsonl / metadata.csv, if present.

    Every problem names the file and the row: bad encoding, invalid JSON, a row that is not an
    object, a missing ``file_name``, a caption that is not text."""
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    rows: list[Any]
    try:
        if jsonl.is_file():
            source = jsonl
            rows = []
            with jsonl.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as err:
                            raise ValueError(f"{source}: line {n} is not valid JSON ({err.msg})") from None
        elif table.is_file():
            source = table
            with table.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            return None
    except UnicodeDecodeError as err:
        raise ValueError(f"{source}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except csv.Error as err:
        raise ValueError(f"{source}: not a valid CSV file ({err})") from None
    captions: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {n} is a {type(row).__name__}, not an object with file_name and {caption_key!r}")
        if not isinstance(row.get("file_name"), str):
            raise ValueError(f"{source}: row {n} has no 'file_name' text (keys: {sorted(map(str, row))})")
        caption = row.get(caption_key)
        if caption is None:
            continue
        if not isinstance(caption, str):
            raise ValueError(f"{source}: row {n}: {caption_key!r} is a {type(caption).__name__}, not text")
        captions[Path(row["file_name"]).as_posix()] = caption
    return captions


class ImageFolderDataset(Dataset):
    """Items ``{"image": [size, size, 3] float32 in [-1, 1], "txt": str, "path": str}``."""

    def __init__(
        self,
        root: str | Path,
        size: int = 512,
        caption_key: str = "text",
        center_crop: bool = True,
        random_flip: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        default_caption: str = "",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} does not exist; expected a directory of images "
                f"with metadata.jsonl/metadata.csv or sidecar .txt captions"
            )
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.paths = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in self.extensions),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.paths:
            raise ValueError(f"no images with extensions {list(self.extensions)} found under {str(self.root)!r}")

        metadata = _read_metadata(self.root, caption_key)
        self.captions: list[str] = []
        self.missing_captions = 0
        for path in self.paths:
            caption = self._caption_for(path, metadata)
            if caption is None:
                self.missing_captions += 1
                caption = default_caption
            self.captions.append(caption)
        if self.missing_captions:
            log.warning("%d of %d image(s) under %s have no caption; using %r",
                        self.missing_captions, len(self.paths), self.root, default_caption)

        # Shared memory so flags set inside DataLoader workers reach the main process.
        self._bad = torch.zeros(len(self.paths), dtype=torch.bool)
        try:
            self._bad.share_memory_()
        except RuntimeError:  # no /dev/shm: counts then cover the main process only
            pass

    def _caption_for(self, path: Path, metadata: dict[str, str] | None) -> str | None:
        if metadata is not None:
            return metadata.get(path.relative_to(self.root).as_posix())
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{sidecar}: caption is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        return None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> int:
        """How many distinct files failed to decode so far."""
        return int(self._bad.sum())

    @property
    def skipped_paths(self) -> list[str]:
        return [self.paths[i].relative_to(self.root).as_posix() for i in torch.nonzero(self._bad).flatten().tolist()]

    def skip_report(self) -> str:
        """One line, e.g. ``"skipped 1 unreadable image(s) of 5: bad.png"``."""
        paths = self.skipped_paths
        if not paths:
            return f"skipped 0 unreadable image(s) of {len(self)}"
        shown = ", ".join(paths[:5]) + (f", ... (+{len(paths) - 5} more)" if len(paths) > 5 else "")
        return f"skipped {len(paths)} unreadable image(s) of {len(self)}: {shown}"

    def _load(self, i: int) -> Image.Image | None:
        try:
            with Image.open(self.paths[i]) as image:
                image.load()  # decode now so truncated files fail here, not later
                return image.convert("RGB")
        except DECODE_ERRORS as err:
            if not self._bad[i]:
                self._bad[i] = True
                log.warning("skipping unreadable image %s (%s: %s)", self.paths[i], type(err).__name__, err)
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.paths)
        for j in (k % n for k in range(i, i + n)):  # wrap around to the next readable file
            if self._bad[j]:
                continue
            image = self._load(j)
            if image is None:
                continue
            flip = self.random_flip and bool(torch.rand(()) < 0.5)
            x, top, left = preprocess_with_crop(image, self.size, self.center_crop, flip)
            return {"image": x, "txt": self.captions[j], "path": str(self.paths[j]),
                    **micro_conditioning((image.height, image.width), (top, left), (self.size, self.size))}
        raise RuntimeError(f"none of the {n} image(s) under {str(self.root)!r} could be decoded; {self.skip_report()}")
