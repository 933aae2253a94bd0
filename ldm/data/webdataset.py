"""``.tar`` shards (``key.jpg``/``key.png`` + ``key.txt``) streamed with the optional ``webdataset`` package."""
from __future__ import annotations

import io
import logging
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from ldm.data.image_folder import DECODE_ERRORS, preprocess_image

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _import_webdataset() -> Any:
    try:
        import webdataset
    except ImportError as err:
        raise ImportError("WebDatasetShards needs the webdataset package: pip install webdataset") from err
    return webdataset


class WebDatasetShards(IterableDataset):
    """Yields ``{"image": [size, size, 3] float32 in [-1, 1], "txt": str, "key": str}``.

    Samples without an image, or whose image fails to decode, are skipped with a warning
    (counted in ``skipped`` for the process that iterates).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        shuffle_buffer: int = 0,
        caption_key: str = "txt",
        image_keys: Sequence[str] = IMAGE_KEYS,
        default_caption: str = "",
    ) -> None:
        self._wds = _import_webdataset()  # fail at construction, not in a worker mid-epoch
        self.urls = urls if isinstance(urls, str) else list(urls)
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.shuffle_buffer, self.caption_key = shuffle_buffer, caption_key
        self.image_keys, self.default_caption = tuple(image_keys), default_caption
        self.skipped = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_wds")  # modules do not pickle (spawned DataLoader workers)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._wds = _import_webdataset()

    def _pipeline(self) -> Any:
        wds = self._wds
        pipe = wds.WebDataset(
            self.urls,
            handler=wds.warn_and_continue,  # a truncated shard must not end the run
            shardshuffle=self.shuffle_buffer > 0,
            nodesplitter=wds.split_by_node,  # each DDP rank reads its own shards
            empty_check=False,
        )
        return pipe.shuffle(self.shuffle_buffer) if self.shuffle_buffer > 0 else pipe

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self._pipeline():
            key = str(sample.get("__key__", "?"))
            raw = next((sample[k] for k in self.image_keys if k in sample), None)
            try:
                if raw is None:
                    raise ValueError(f"no image entry among {list(self.image_keys)}")
                with Image.open(io.BytesIO(raw)) as image:
                    image.load()
                    image = image.convert("RGB")
            except DECODE_ERRORS as err:
                self.skipped += 1
                log.warning("skipping webdataset sample %s (%s: %s)", key, type(err).__name__, err)
                continue
            caption = sample.get(self.caption_key)
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8")
            caption = caption.strip() if isinstance(caption, str) else self.default_caption
            flip = self.random_flip and bool(torch.rand(()) < 0.5)
            yield {"image": preprocess_image(image, self.size, self.center_crop, flip), "txt": caption, "key": key}
