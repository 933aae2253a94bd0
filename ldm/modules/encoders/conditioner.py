"""The conditioner: a batch dict -> ``{"crossattn", "vector", "concat"}``, from a list of embedders.

Each embedder reads one or more batch keys (``input_keys``), may be trainable or frozen, and may be
dropped per sample for classifier-free guidance training (``ucg_rate``; with ``ucg_value`` the
*input* is replaced, e.g. a caption by "", as CompVis and SD 2 do; without it the *output* is
zeroed, as sgm does). Outputs are combined by their rank: ``[B, D]`` -> ``vector`` (pooled text,
size/crop embeddings), ``[B, T, D]`` -> ``crossattn``, ``[B, C, H, W]`` -> ``concat``, each
concatenated along its feature axis in embedder order. When several embedders read the same key
(SDXL's two text encoders read ``txt``), the second one takes ``txt_2`` if the batch has it.

SD 1.x / 2.x are a conditioner with one text embedder (plus the mask/masked-image embedder for
inpainting models) over the model's ``cond_stage_model``, whose checkpoint keys stay as they are.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

KIND_BY_RANK = {2: "vector", 3: "crossattn", 4: "concat"}
CAT_DIM = {"vector": 1, "crossattn": 2, "concat": 1}


class Embedder(nn.Module):
    """What the conditioner needs to know about one embedder besides its forward."""

    def __init__(self, input_keys: Sequence[str], *, is_trainable: bool = False, ucg_rate: float = 0.0,
                 ucg_value: Any = None) -> None:
        super().__init__()
        if not 0.0 <= ucg_rate <= 1.0:
            raise ValueError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.input_keys, self.is_trainable = tuple(input_keys), is_trainable
        self.ucg_rate, self.ucg_value = float(ucg_rate), ucg_value

    @property
    def input_key(self) -> str:
        return self.input_keys[0]

    def text_encoder(self) -> Optional[nn.Module]:
        """The text encoder module inside, if this embedder encodes text (LoRA and caching look here)."""
        return None


class StageEmbedder(Embedder):
    """A CompVis cond stage (CLIP / OpenCLIP text encoder, class embedder, ...) as an embedder.

    ``encode`` is how the owning model encodes raw conditioning (``get_learned_conditioning``), so
    CompVis' ``cond_stage_forward`` and long prompts behave exactly as before."""

    def __init__(self, stage: nn.Module, input_key: str, encode: Callable[[Any], torch.Tensor], **options: Any) -> None:
        super().__init__((input_key,), **options)
        self.stage = stage
        self.__dict__["_encode"] = encode  # a method of the owning model: not a submodule

    def forward(self, conditioning: Any) -> torch.Tensor:
        return self._encode(list(conditioning) if isinstance(conditioning, tuple) else conditioning)

    def text_encoder(self) -> Optional[nn.Module]:
        return self.stage if hasattr(self.stage, "tokenizer") else None


class MaskedImageEmbedder(Embedder):
    """Inpainting models' extra input channels: the mask at latent size, then the masked image's latents.

    ``encode(images, sample)`` maps images in [-1, 1] to (scaled) latents, drawing from the posterior
    in training mode (as the models were trained) and taking its mode otherwise (deterministic sampling)."""

    def __init__(self, encode: Callable[[torch.Tensor, bool], torch.Tensor],
                 input_keys: Sequence[str] = ("mask", "masked_image"), masked_image_key: str = "masked_image") -> None:
        super().__init__(input_keys)
        if masked_image_key not in self.input_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} must be one of {self.input_keys}")
        self.__dict__["_encode"] = encode  # a function of the owning model: not a submodule
        self.masked_image_key = masked_image_key

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        from ldm.util import images_to_bchw

        values = dict(zip(self.input_keys, (images_to_bchw(x) for x in inputs)))
        latents = self._encode(values[self.masked_image_key], self.training)
        parts = [latents if key == self.masked_image_key else F.interpolate(values[key].to(latents), size=latents.shape[-2:])
                 for key in self.input_keys]
        return torch.cat(parts, dim=1)


class Conditioner(nn.Module):
    """A list of embedders whose outputs form the conditioning dict (see the module doc)."""

    def __init__(self, embedders: Iterable[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        for emb in self.embedders:
            missing = [a for a in ("input_keys", "is_trainable", "ucg_rate", "ucg_value") if not hasattr(emb, a)]
            if missing:
                raise TypeError(f"{type(emb).__name__} is not an embedder: it lacks {', '.join(missing)}")

    @property
    def input_keys(self) -> list[str]:
        return [k for emb in self.embedders for k in emb.input_keys]

    def text_encoders(self) -> list[nn.Module]:
        return [enc for emb in self.embedders if (enc := text_encoder_of(emb)) is not None]

    def drop(self, batch: Mapping[str, Any], extra: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict:
        """Classifier-free guidance training: per sample, replace inputs by their null value with each
        embedder's ``ucg_rate`` (and ``extra``: CompVis ``ucg_training`` = {key: {p, val}})."""
        specs = {emb.input_keys[0]: (emb.ucg_rate, emb.ucg_value) for emb in self.embedders
                 if emb.ucg_rate > 0 and emb.ucg_value is not None}
        specs.update({key: (float(spec["p"]), spec["val"]) for key, spec in (extra or {}).items()})
        if not specs:
            return dict(batch)
        out = dict(batch)
        for key, (p, value) in specs.items():
            drop = (torch.rand(len(out[key])) < p).tolist()
            out[key] = [value if d else v for d, v in zip(drop, out[key])]
        return out

    def forward(self, batch: Mapping[str, Any], *, kinds: Optional[Iterable[str]] = None,
                zero_keys: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The conditioning dict of ``batch``. ``kinds`` keeps only those outputs (and skips embedders whose
        inputs the batch lacks); ``zero_keys`` zeroes the embeddings of those input keys (sgm's
        ``force_zero_embeddings``)."""
        wanted, zeroed = (set(kinds) if kinds is not None else None), set(zero_keys)
        out: dict[str, torch.Tensor] = {}
        readers: dict[str, int] = {}
        for emb in self.embedders:
            keys = []
            for key in emb.input_keys:  # the n-th reader of a key takes "<key>_<n>" if the batch has it
                readers[key] = readers.get(key, 0) + 1
                keys.append(f"{key}_{readers[key]}" if readers[key] > 1 and f"{key}_{readers[key]}" in batch else key)
            missing = [k for k in keys if k not in batch]
            if missing and wanted is not None:  # a partial batch for some outputs only
                continue
            if missing:
                raise KeyError(f"the batch has no {', '.join(map(repr, missing))} (the conditioner's "
                               f"{type(emb).__name__} reads it); batch keys: {sorted(batch)}")
            grad = nullcontext() if emb.is_trainable and torch.is_grad_enabled() else torch.no_grad()
            with grad:
                values = emb(*(batch[k] for k in keys))
            for value in values if isinstance(values, (list, tuple)) else [values]:
                kind = KIND_BY_RANK.get(value.dim())
                if kind is None:
                    raise ValueError(f"{type(emb).__name__} returned a {value.dim()}-d tensor; expected 2, 3 or 4")
                if kind == "crossattn" and kind in out and out[kind].shape[1] != value.shape[1]:
                    raise ValueError(f"the text encoders give {out[kind].shape[1]} and {value.shape[1]} tokens: "
                                     "prompt and prompt_2 must need the same number of 75-token windows")
                if wanted is not None and kind not in wanted:
                    continue
                if emb.ucg_rate > 0 and emb.ucg_value is None and self.training:
                    keep = torch.bernoulli(torch.full((value.shape[0],), 1.0 - emb.ucg_rate)).to(value)
                    value = value * keep.view(-1, *[1] * (value.dim() - 1))
                if zeroed.intersection(emb.input_keys):
                    value = torch.zeros_like(value)
                out[kind] = torch.cat([out[kind], value], CAT_DIM[kind]) if kind in out else value
        return out


def text_encoder_of(embedder: nn.Module) -> Optional[nn.Module]:
    """The text encoder an embedder is or holds (it tokenizes), or None."""
    if hasattr(embedder, "text_encoder"):
        return embedder.text_encoder()
    return embedder if hasattr(embedder, "tokenizer") else None


class GeneralConditioner(Conditioner):
    """The conditioner as ``sgm`` configs declare it (``emb_models``: target/params plus ``input_key`` or
    ``input_keys``, ``is_trainable``, ``ucg_rate``, ``legacy_ucg_value``); each built module *is* the
    embedder, so checkpoint keys are ``conditioner.embedders.N.*`` as in the official files."""

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]) -> None:
        from ldm.util import ConfigError, disabled_train, instantiate_from_config

        embedders = []
        for n, spec in enumerate(emb_models):
            spec = dict(spec)
            unknown = set(spec) - {"target", "params", "input_key", "input_keys", "is_trainable", "ucg_rate",
                                   "legacy_ucg_value"}
            if unknown:
                raise ConfigError(f"GeneralConditioner: emb_models[{n}] has unknown key(s) {sorted(unknown)}")
            if ("input_key" in spec) == ("input_keys" in spec):
                raise ConfigError(f"GeneralConditioner: emb_models[{n}] needs exactly one of input_key / input_keys")
            emb = instantiate_from_config(spec)
            emb.input_keys = tuple(spec["input_keys"]) if "input_keys" in spec else (spec["input_key"],)
            emb.is_trainable = bool(spec.get("is_trainable", False))
            emb.ucg_rate = float(spec.get("ucg_rate", 0.0))
            emb.ucg_value = spec.get("legacy_ucg_value")
            if not emb.is_trainable:
                emb.train = disabled_train.__get__(emb)
                emb.eval()
                for p in emb.parameters():
                    p.requires_grad_(False)
            embedders.append(emb)
        super().__init__(embedders)


def compvis_conditioning(cond: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A conditioning dict in the ``c_concat`` / ``c_crossattn`` / ``c_adm`` form ``apply_model`` takes."""
    names = {"concat": "c_concat", "crossattn": "c_crossattn"}
    out: dict[str, Any] = {names[k]: [v] for k, v in cond.items() if k in names}
    if "vector" in cond:
        out["c_adm"] = cond["vector"]
    return out
