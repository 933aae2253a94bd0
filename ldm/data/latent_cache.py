"""Latent and text-embedding caching for fine-tuning with frozen first and cond stages.

With the autoencoder and the text encoder frozen, every epoch would encode the same images and
captions again. :func:`build_cache` runs both once over a dataset and stores, per item, the
encoder's posterior *moments* (mean and log-variance, so a fresh latent is still sampled every
step, as without the cache) and the caption's context; :class:`CachedLatentDataset` serves them and
``LatentDiffusion.get_input`` uses them instead of running the two encoders (captions dropped for
classifier-free guidance get the null caption's context, computed once).

A cache is one safetensors file plus its description. It is keyed on a fingerprint of the two
encoders' weights and of the dataset (its config and length): a cache made with other weights or
another dataset config is not used; it is rebuilt. In a distributed run rank 0 builds it and
the other ranks wait for it. (Files changed on disk under the same config
are not detected: delete the cache directory after editing a dataset.)

Random augmentations of the dataset are frozen at caching time (one crop per image), except
horizontal flips: ``flip=True`` caches both orientations and each access picks one at random.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ldm.files import atomic_output, atomic_write
from ldm.util import images_to_bchw

CACHE_FILE = "latents.safetensors"
INFO_FILE = "cache.json"
FORMAT = 1


def module_fingerprint(module: Optional[torch.nn.Module]) -> str:
    """Hash of a module's state (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    if module is not None:
        for name, tensor in sorted(module.state_dict().items()):
            if name.startswith("loss."):  # an autoencoder's training-only discriminator/LPIPS: not the encoder
                continue
            t = tensor.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        for key, value in sorted(vars(module).items()):  # plain settings (e.g. a text encoder's layer choice)
            if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                h.update(f"{key}={value!r}".encode())
    return h.hexdigest()


def _text_embedders(model: torch.nn.Module) -> list:
    """The conditioner's embedders, if each of them encodes text (else caching does not apply)."""
    embedders = list(model.conditioner.embedders)
    return embedders if all(e.text_encoder() is not None for e in embedders) else []


def can_cache_context(model: torch.nn.Module, text_encoder_trains: bool = False) -> bool:
    """The caption context is cacheable when the conditioner is one frozen text encoder."""
    embedders = _text_embedders(model)
    return len(embedders) == 1 and not embedders[0].is_trainable and not text_encoder_trains


@torch.no_grad()
def build_cache(model: torch.nn.Module, dataset: Dataset, cache_dir: str | Path, *, dataset_id: str = "",
                batch_size: int = 16, flip: bool = False, with_context: bool = True) -> Path:
    """Encode ``dataset`` once into ``cache_dir``; returns the directory. Reuses a matching cache."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is None or (len(conditioner.embedders) and not _text_embedders(model)):
        reads = ", ".join(conditioner.input_keys) if conditioner is not None else "no conditioner"
        raise ValueError(f"latent caching needs a text- or unconditional latent diffusion model; this one's "
                         f"conditioner reads {reads}: turn data.cache off")
    cache_dir = Path(cache_dir)
    with_context = with_context and can_cache_context(model)
    fingerprint = _fingerprint(model, dataset, dataset_id, flip, with_context)
    if _matches(cache_dir, fingerprint):
        return cache_dir
    if _rank() != 0:  # other ranks of a distributed run wait for rank 0's cache
        return _wait_for(cache_dir, fingerprint)

    with torch.random.fork_rng(devices=[]):  # caching leaves the run's random stream as it was
        tensors, info = _encode(model, dataset, batch_size, flip, with_context)
    info["fingerprint"] = fingerprint
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / INFO_FILE).unlink(missing_ok=True)  # an old description must not vouch for new tensors
    with atomic_output(cache_dir / CACHE_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write(cache_dir / INFO_FILE, json.dumps(info))  # written last: it marks the cache complete
    return cache_dir


def _encode(model, dataset, batch_size: int, flip: bool, with_context: bool) -> tuple[dict, dict]:
    from ldm.data.datamodule import collate

    text = _text_embedders(model)
    image_key, caption_key = model.first_stage_key, (text[0].input_key if text else model.cond_stage_key)
    device = next(model.first_stage_model.parameters()).device
    moments, flipped, contexts, captions = [], [], [], []
    conditional = bool(text)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=0)
    for batch in loader:
        x = images_to_bchw(batch[image_key]).to(device)
        posterior = model.encode_first_stage(x)
        if isinstance(posterior, torch.Tensor):  # VQModelInterface, IdentityFirstStage: no posterior to cache
            raise ValueError(f"the latent cache stores a KL autoencoder's posterior moments, but this model's first stage "
                             f"is {type(model.first_stage_model).__name__}; set data.cache.enabled=false")
        moments.append(posterior.parameters.float().cpu())
        if flip:
            flipped.append(model.encode_first_stage(x.flip(-1)).parameters.float().cpu())
        if conditional:
            if caption_key not in batch:
                raise ValueError(f"dataset items have no {caption_key!r} (the model's cond_stage_key); "
                                 f"check data.train or the model's cond_stage_key")
            if not all(isinstance(c, str) for c in batch[caption_key]):
                raise ValueError(f"latent caching supports text conditioning; {caption_key!r} holds "
                                 f"{type(batch[caption_key]).__name__}, not captions: turn data.cache off")
            captions += list(batch[caption_key])
        if with_context:
            batch_captions = captions[-len(batch[caption_key]):]
            contexts.append(model.conditioner({caption_key: batch_captions})["crossattn"].float().cpu())
    tensors = {"moments": torch.cat(moments)}
    if flip:
        tensors["moments_flipped"] = torch.cat(flipped)
    info: dict[str, Any] = {"format": FORMAT, "items": len(tensors["moments"]), "flip": flip,
                            "image_key": image_key, "caption_key": caption_key, "context": with_context}
    if with_context and contexts:
        # Caption dropout swaps in the null caption's context: every cached context must have its shape.
        null_shape = model.get_learned_conditioning([""]).shape[1:]
        if any(c.shape[1:] != null_shape for c in contexts):
            warnings.warn("latent cache: captions longer than one 77-token window give longer contexts; "
                          "caching latents only (the text encoder runs during training)")
            with_context = info["context"] = False
    if with_context:
        tensors["context"] = torch.cat(contexts)
    info["captions"] = captions
    return tensors, info


class CachedLatentDataset(Dataset):
    """Items ``{"moments": [2C, h, w], "context": [T, D] (if cached), <caption key>: str}`` from :func:`build_cache`."""

    def __init__(self, cache_dir: str | Path):
        cache_dir = Path(cache_dir)
        info_file = cache_dir / INFO_FILE
        if not info_file.is_file():
            raise FileNotFoundError(f"no latent cache in {cache_dir} ({INFO_FILE} missing); build it with data.cache.enabled=true")
        self.info = json.loads(info_file.read_text())
        self.tensors = load_file(str(cache_dir / CACHE_FILE))
        self.captions: Sequence[str] = self.info.get("captions") or [""] * self.info["items"]

    def __len__(self) -> int:
        return int(self.info["items"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        key = "moments"
        if self.info["flip"] and torch.rand(()) < 0.5:
            key = "moments_flipped"
        item = {"moments": self.tensors[key][i], self.info["caption_key"]: self.captions[i]}
        if self.info["context"]:
            item["context"] = self.tensors["context"][i]
        return item


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0"))))


def _wait_for(cache_dir: Path, fingerprint: str, timeout_s: float = 6 * 3600) -> Path:
    deadline = time.monotonic() + timeout_s
    while not _matches(cache_dir, fingerprint):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {_rank()}: no latent cache in {cache_dir} after {timeout_s:.0f} s; "
                               f"did rank 0 fail? build it first with a single-process run")
        time.sleep(2.0)
    return cache_dir


def _fingerprint(model, dataset, dataset_id: str, flip: bool, with_context: bool) -> str:
    h = hashlib.sha256()
    parts = [str(FORMAT), dataset_id, str(len(dataset)), str(flip), str(with_context),
             str(model.first_stage_key), str(model.cond_stage_key),
             module_fingerprint(model.first_stage_model),
             module_fingerprint(model.cond_stage_model) if with_context else ""]
    for part in parts:
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()


def _matches(cache_dir: Path, fingerprint: str) -> bool:
    try:
        info = json.loads((cache_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    if info.get("fingerprint") != fingerprint or not (cache_dir / CACHE_FILE).is_file():
        return False
    try:  # a damaged tensors file (truncated copy, disk error) is rebuilt, not trusted
        with safe_open(cache_dir / CACHE_FILE, framework="pt") as f:
            return "moments" in f.keys() and f.get_slice("moments").get_shape()[0] == info.get("items")
    except Exception:  # noqa: BLE001 - any unreadable file means: rebuild
        return False
