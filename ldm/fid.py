"""Fréchet Inception Distance (FID) of generated samples against real images, through torchmetrics.

FID needs torch-fidelity (the InceptionV3 network torchmetrics runs) and the FID Inception weights
as a local file. Nothing is ever downloaded: without a weights file FID is an error, not a fetch.

    fid = fid_from_images(real, fake, "weights-inception-2015-12-05-6726825d.pth")   # [B, 3, H, W] in [0, 1]

Images of any size are resized to 299x299 by the metric, with the bilinear resize of the reference
TensorFlow / torch-fidelity implementation (no antialiasing). FID is biased by the number of
images: compare runs only at the same count.
"""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"


def check_fid_setup(weights_path: Union[str, Path, None]) -> Path:
    """The weights file as a Path; a one-line error naming the fix if it or torch-fidelity is missing."""
    if not weights_path:
        raise FileNotFoundError(f"FID needs a local Inception weights file ({WEIGHTS_FILE}, from {WEIGHTS_URL}); "
                                "nothing is downloaded")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights {path} not found; fetch {WEIGHTS_URL} on a machine with "
                                "internet access and pass that file (nothing is downloaded)")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError("FID needs torch-fidelity (the Inception network torchmetrics uses): "
                                  "pip install torch-fidelity") from err
    return path


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Turn any weight download torch-fidelity might attempt into an error, and its torch.load into weights_only."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(f"refusing to download {url}: FID runs offline; pass a local weights file")

    real_load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:  # torch-fidelity asks for weights_only=False
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    saved = (inception.load_state_dict_from_url, torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file,
             torch.load)
    inception.load_state_dict_from_url = torch.hub.load_state_dict_from_url = torch.hub.download_url_to_file = refuse
    torch.load = weights_only_load
    try:
        yield
    finally:
        (inception.load_state_dict_from_url, torch.hub.load_state_dict_from_url, torch.hub.download_url_to_file,
         torch.load) = saved


def build_fid_metric(weights_path: Union[str, Path], feature: int = 2048,
                     **metric_kwargs: Any) -> FrechetInceptionDistance:
    """A torchmetrics ``FrechetInceptionDistance`` over the given weights file; feed it uint8 images.

    It computes on its own process: under DDP only rank 0 evaluates, and a cross-rank sync would hang.
    """
    path = check_fid_setup(weights_path)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric_kwargs.setdefault("sync_on_compute", False)

    try:
        with _no_downloads():  # also makes torch-fidelity's own torch.load weights_only
            return FrechetInceptionDistance(feature=feature, normalize=False, antialias=False,
                                            feature_extractor_weights_path=str(path), **metric_kwargs)
    except (RuntimeError, pickle.UnpicklingError) as err:  # wrong keys/shapes or not a torch file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not the FID Inception weights file torch-fidelity expects ({first}); "
                         f"use {WEIGHTS_URL}") from err


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float images ``[B, C, H, W]`` in [0, 1] as uint8 RGB, rounded like saved PNGs (grey repeated, alpha dropped)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected images [B, C, H, W] with 1, 3 or 4 channels, got shape {tuple(images.shape)}")
    rgb = images[:, :3] if images.shape[1] != 1 else images.expand(-1, 3, -1, -1)
    return (rgb.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def add_images(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch_size: int = 50) -> None:
    """Feed float images in [0, 1] to ``metric`` in batches (the real or the generated side)."""
    device = metric.device
    for chunk in images.split(batch_size):
        metric.update(to_uint8_rgb(chunk).to(device), real=real)


def fid_from_images(real: torch.Tensor, fake: torch.Tensor, weights_path: Union[str, Path], *, feature: int = 2048,
                    batch_size: int = 50, device: Union[str, torch.device, None] = None) -> float:
    """FID between two image sets ``[B, C, H, W]`` in [0, 1] (any size; at least 2 images each)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    metric = build_fid_metric(weights_path, feature).to(device or real.device)
    add_images(metric, real, real=True, batch_size=batch_size)
    add_images(metric, fake, real=False, batch_size=batch_size)
    return float(metric.compute())


def _validation_batches(data: Any, batch_size: int) -> Any:
    """Batches of the validation split of a LightningDataModule, or of a plain dataset."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    if isinstance(data, pl.LightningDataModule):
        loader = data.val_dataloader()
        if isinstance(loader, (list, tuple)):
            if not loader:
                raise ValueError("FID compares with the validation images, but no validation data is configured "
                                 "(set data.validation)")
            loader = loader[0]
        return loader
    from ldm.data.datamodule import collate

    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _caption_key(model: torch.nn.Module, batch: dict) -> str:
    for key in (getattr(model, "cond_stage_key", None), "txt", "caption"):
        if key in batch and isinstance(batch[key], (list, tuple)):
            return key
    raise ValueError(f"FID generates from the validation captions, but the batches have none (keys: {sorted(batch)})")


@torch.no_grad()
def evaluate_fid(model: torch.nn.Module, data: Any, weights_path: Union[str, Path], num_samples: int = 100,
                 seed: int = 0, batch_size: int = 16, feature: int = 2048, sampling: Optional[dict] = None) -> float:
    """FID of ``num_samples`` images generated from validation captions against those validation images.

    ``data`` is a datamodule (its validation split is used) or a dataset of ``{"image", "txt"/"caption"}``
    items (images channels-last or first, in [-1, 1]). ``sampling`` goes to :func:`ldm.generation.generate`;
    height and width default to the real images' size. Image ``i`` uses seed ``seed + i``.
    """
    from ldm.generation import generate
    from ldm.util import images_to_bchw

    if num_samples < 2:
        raise ValueError(f"FID needs num_samples >= 2, got {num_samples}")
    metric = build_fid_metric(weights_path, feature).to(next(model.parameters()).device)  # fail before sampling
    image_key = getattr(model, "first_stage_key", "image")
    captions: list[str] = []
    size: Optional[tuple[int, int]] = None
    for batch in _validation_batches(data, batch_size):
        take = num_samples - len(captions)
        images = (images_to_bchw(batch[image_key][:take]) + 1) / 2
        add_images(metric, images, real=True, batch_size=batch_size)
        captions += list(batch[_caption_key(model, batch)][:take])
        size = size or tuple(images.shape[-2:])
        if len(captions) >= num_samples:
            break
    if len(captions) < num_samples:
        raise ValueError(f"FID asked for {num_samples} samples but the validation set has {len(captions)} images; "
                         "lower num_samples")
    options = {"height": size[0], "width": size[1], **(sampling or {})}
    for start in range(0, num_samples, batch_size):
        prompts = captions[start:start + batch_size]
        seeds = [seed + start + i for i in range(len(prompts))]
        fake = generate(model, prompts, seeds=seeds, progress=False, batch_invariant=False, **options)
        add_images(metric, fake, real=False, batch_size=batch_size)
    return float(metric.compute())
