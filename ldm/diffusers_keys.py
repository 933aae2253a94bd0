"""CompVis <-> diffusers weight names, derived from diffusers' own single-file conversion utilities.

diffusers converts CompVis (LDM) state dicts into its layout (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``); :func:`to_diffusers` runs them on the parts of our state dict. The way
back is the same conversion run once on *tags*: every CompVis tensor is replaced by a tiny tensor holding
the ids of its rows (shape ``(rows, 1, ..., 1)``, same number of dims), so each diffusers tensor the
conversion returns names the CompVis tensor and rows it came from: renamed, row-sliced (OpenCLIP's fused
q/k/v), transposed (OpenCLIP's text projection) or with unit dims squeezed (the VAE's attention convs).
:class:`KeyMap` inverts those records; no key table is written by hand here.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import nn

from ldm.checkpoint import GUIDANCE_INPUT_KEY, CheckpointError

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
GUIDANCE_KEY = GUIDANCE_INPUT_KEY.removeprefix(UNET_PREFIX)  # an LCM UNet's guidance projection: the same name in both
DIFFUSERS_HINT = "reading or writing diffusers folders needs the diffusers package: pip install diffusers"


def single_file_utils() -> Any:
    """``diffusers.loaders.single_file_utils``, imported on first use (diffusers is optional)."""
    try:
        from diffusers.loaders import single_file_utils
    except ImportError:
        raise CheckpointError(DIFFUSERS_HINT) from None
    return single_file_utils


@dataclasses.dataclass(frozen=True)
class TextSlot:
    """One text encoder of our model and where diffusers keeps it."""

    component: str  # folder name: text_encoder / text_encoder_2
    kind: str  # "clip" (transformers' CLIP keys, SD 1.x / SDXL's first) or "openclip" (open_clip keys)
    prefix: str  # CompVis key prefix of its weights
    width: int
    layers: int  # transformer layers in our model
    dropped: int = 0  # final layers the diffusers encoder leaves out (SD 2: its output is our penultimate layer's)
    projection: bool = False  # diffusers keeps the text projection (SDXL's CLIPTextModelWithProjection)

    def skipped(self, key: str) -> bool:
        """Weights of ours that this diffusers encoder has no place for (they stay CompVis-only)."""
        if self.kind != "openclip":
            return False
        rest = key[len(self.prefix):]
        if rest == "text_projection":
            return not self.projection
        if rest.startswith("transformer.resblocks."):
            return int(rest.split(".")[2]) >= self.layers - self.dropped
        return False


def text_slots(model: nn.Module) -> list[TextSlot]:
    """Our model's text encoders in diffusers' order: SD's one; SDXL base's two, the refiner's OpenCLIP only."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
    from ldm.modules.encoders.sdxl import FrozenOpenCLIPEmbedder2

    conditioner = dict(model.named_children()).get("conditioner")
    if conditioner is None:
        encoders = [("cond_stage_model.", getattr(model, "cond_stage_model", None))]
        names = ["text_encoder"]
    else:
        encoders = [(f"conditioner.embedders.{i}.", e) for i, e in enumerate(conditioner.embedders)
                    if isinstance(e, (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder))]
        names = ["text_encoder", "text_encoder_2"][-len(encoders):] if 0 < len(encoders) <= 2 else []
    if not names or len(names) != len(encoders):
        raise CheckpointError(f"{type(model).__name__} has {len(encoders)} text encoders; diffusers folders hold "
                              "SD 1.x/2.x (one) or SDXL (CLIP + OpenCLIP, or the refiner's OpenCLIP)")
    slots = []
    for name, (prefix, enc) in zip(names, encoders):
        if isinstance(enc, FrozenCLIPEmbedder):
            cfg = enc.transformer.config
            slots.append(TextSlot(name, "clip", prefix + "transformer.", cfg.hidden_size, cfg.num_hidden_layers))
        elif isinstance(enc, FrozenOpenCLIPEmbedder):
            oc = enc.model
            sdxl = isinstance(enc, FrozenOpenCLIPEmbedder2) and conditioner is not None
            slots.append(TextSlot(name, "openclip", prefix + "model.", oc.positional_embedding.shape[1],
                                  len(oc.transformer.resblocks), dropped=0 if sdxl else enc.layer_idx, projection=sdxl))
        else:
            raise CheckpointError(f"text encoder {type(enc).__name__} has no diffusers counterpart; "
                                  "diffusers folders hold CLIP / OpenCLIP text encoders")
    return slots


def to_diffusers(state: Mapping[str, torch.Tensor], slots: list[TextSlot], unet_config: Mapping[str, Any],
                 vae_config: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers state dicts per component (unet, vae, text_encoder[_2]) of a CompVis ``state``, by diffusers'
    conversion utilities. Text-encoder keys carry transformers' ``text_model.`` prefix."""
    sf = single_file_utils()

    def part(prefix: str, slot: TextSlot | None = None) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k.startswith(prefix) and not (slot and slot.skipped(k))}

    out = {"unet": sf.convert_ldm_unet_checkpoint(part(UNET_PREFIX), dict(unet_config)),
           "vae": sf.convert_ldm_vae_checkpoint(part(VAE_PREFIX), dict(vae_config))}
    if GUIDANCE_INPUT_KEY in state:  # guidance-distilled UNets (LCM): our key is diffusers' name, which its utilities skip
        out["unet"][GUIDANCE_KEY] = state[GUIDANCE_INPUT_KEY]
    for slot in slots:
        if slot.kind == "clip":
            out[slot.component] = sf.convert_ldm_clip_checkpoint(part(slot.prefix), remove_prefix=slot.prefix)
        else:  # the text model is only asked for its width, where the projection does not say it
            stub = SimpleNamespace(config=SimpleNamespace(hidden_size=slot.width))
            out[slot.component] = sf.convert_open_clip_checkpoint(stub, part(slot.prefix, slot), prefix=slot.prefix)
    return out


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where one diffusers tensor comes from: rows [start, stop) of a CompVis tensor, maybe transposed."""

    key: str
    start: int
    stop: int
    transposed: bool


class KeyMap:
    """diffusers (component, key) -> CompVis rows, for one model architecture; see the module docstring."""

    def __init__(self, model: nn.Module, slots: list[TextSlot], unet_config: Mapping[str, Any],
                 vae_config: Mapping[str, Any]) -> None:
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tags, starts, keys, start = {}, [], [], 0
        for key, shape in self.shapes.items():
            rows = shape[0] if shape else 1
            ids = torch.arange(start, start + rows, dtype=torch.float64)
            tags[key] = ids.reshape((rows,) + (1,) * (len(shape) - 1)) if shape else ids.reshape(())
            starts.append(start)
            keys.append(key)
            start += rows
        meta = {k: torch.empty(s, device="meta") for k, s in self.shapes.items()}
        tagged = to_diffusers(tags, slots, unet_config, vae_config)
        shaped = to_diffusers(meta, slots, unet_config, vae_config)
        self.pieces: dict[str, dict[str, Piece]] = {}
        self.expected: dict[str, dict[str, tuple[int, ...]]] = {}
        covered: dict[str, int] = defaultdict(int)
        for component, tensors in tagged.items():
            self.pieces[component], self.expected[component] = {}, {}
            for dkey, tag in tensors.items():
                ids = tag.reshape(-1).long()
                index = bisect.bisect_right(starts, int(ids[0])) - 1
                key, first = keys[index], int(ids[0]) - starts[index]
                if not torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + len(ids))):
                    raise CheckpointError(f"diffusers' conversion of {key} into {component}.{dkey} is not a row range; "
                                          "this diffusers version is not supported")
                transposed = tag.dim() == 2 and tag.shape[0] == 1 and tag.shape[1] > 1
                self.pieces[component][dkey] = Piece(key, first, first + len(ids), transposed)
                self.expected[component][dkey] = tuple(shaped[component][dkey].shape)
                covered[key] += len(ids)
        rows = {k: (s[0] if s else 1) for k, s in self.shapes.items()}
        self.covered = {k for k, n in covered.items() if n == rows[k]}
        partial = sorted(k for k, n in covered.items() if n != rows[k])
        if partial:
            raise CheckpointError(f"diffusers' conversion covers only part of {', '.join(partial[:3])}; "
                                  "this diffusers version is not supported")

    def from_diffusers(self, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """CompVis tensors (the covered keys) from diffusers component state dicts checked by :meth:`check`.
        Renamed tensors are the same tensors (views); split ones are concatenated back."""
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for component, mapping in self.pieces.items():
            for dkey, piece in mapping.items():
                tensor = parts[component][dkey]
                tensor = tensor.T.contiguous() if piece.transposed else tensor
                shape = self.shapes[piece.key]
                pieces[piece.key].append((piece.start, tensor.reshape((piece.stop - piece.start,) + shape[1:])
                                          if shape else tensor.reshape(())))
        out = {}
        for key, items in pieces.items():
            items.sort(key=lambda item: item[0])
            out[key] = items[0][1] if len(items) == 1 else torch.cat([t for _, t in items])
        return out

    def check(self, component: str, state: Mapping[str, torch.Tensor], where: str) -> None:
        """One-line CheckpointError unless ``state`` has exactly the keys and shapes this architecture needs."""
        expected = self.expected.get(component, {})
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
        problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes))
                    if items]
        if problems:
            raise CheckpointError(f"{where} does not match its config: {'; '.join(problems)}")
