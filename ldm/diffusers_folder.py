"""diffusers pipeline folders as our models, both ways (SD 1.x, 2.x eps / v, SDXL base / refiner).

    model = load_model("stable-diffusion-v1-5")            # a folder: config derived, weights mapped (ldm.api)
    write_folder(state, model, node, "out-folder")          # CompVis weights -> a diffusers folder

Reading: ``model_index.json`` and the component configs decide the family and sizes
(:mod:`ldm.diffusers_config`); each component's weights (``.safetensors``, ``.fp16.safetensors``, sharded, or
``.bin`` read with ``weights_only``) must hold exactly the keys and shapes diffusers' conversion of that
architecture gives (:mod:`ldm.diffusers_keys`), and become CompVis keys. The tokenizers are checked, not used:
ours tokenize with CLIP's own BPE, so a folder's ``vocab.json`` must be that vocabulary, padded as the text
encoder expects (a folder without tokenizer files is fine). What a diffusers folder has no place for is
filled in: the noise-schedule buffers from the config, and the weights our OpenCLIP encoders hold but never
use there (SD 2's last layer, which diffusers drops since SD 2 reads the penultimate one, its text
projection, ``logit_scale``) with zeros.

Writing: the components are diffusers' and transformers' own classes (built empty, given the converted
tensors) saved by the pipeline's ``save_pretrained``, into a temporary folder renamed into place at the end.
CompVis tensors with no diffusers place go to ``compvis_extras.safetensors`` beside ``model_index.json``
(diffusers ignores it), so folder -> CompVis gives back the very file it came from.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn

from ldm.checkpoint import CheckpointError, read_state_dict, save_state_dict
from ldm.diffusers_config import FolderConfigs, config_from_folder, diffusers_configs
from ldm.diffusers_keys import DIFFUSERS_HINT, KeyMap, TextSlot, text_slots, to_diffusers

PathLike = Union[str, os.PathLike]
EXTRAS = "compvis_extras.safetensors"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
             "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "LatentConsistencyModelPipeline",
             "LatentConsistencyModelImg2ImgPipeline")
# Few-step schedulers: a folder that ships one samples with our sampler of that name by default, at the step count
# and guidance diffusers' LCM pipeline defaults to (8.5 for guidance-distilled UNets, which take it as an input;
# 1 = unguided for the others, e.g. LCM-LoRA fused into the weights).
FEW_STEP_SCHEDULERS = {"LCMScheduler": "lcm", "TCDScheduler": "tcd"}
COMPONENT_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                     "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                     "text_encoder_2": ("CLIPTextModel", "CLIPTextModelWithProjection")}
# (safetensors stem, pickle stem) of a component's weights, by library; each may be an fp16 variant or sharded.
WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
                "text_encoder": ("model", "pytorch_model"), "text_encoder_2": ("model", "pytorch_model")}


def require_diffusers() -> Any:
    """The diffusers package, or a one-line CheckpointError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise CheckpointError(DIFFUSERS_HINT) from None
    return diffusers


def is_diffusers_folder(path: Optional[Any]) -> bool:
    """Whether ``path`` names a folder (with or without ``model_index.json``: a wrong folder is reported later)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).expanduser().is_dir()


def read_configs(folder: PathLike) -> FolderConfigs:
    """The folder's ``model_index.json`` and component configs; one-line errors for a wrong or incomplete folder."""
    root = Path(folder).expanduser()
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} is a folder but not a diffusers pipeline folder (no model_index.json); pass a "
                              ".safetensors/.ckpt file, or a folder written by diffusers' save_pretrained")
    index = _json(index_file)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise CheckpointError(f"{root}: pipeline {pipeline!r} is not supported; diffusers folders of SD 1.x/2.x and "
                              f"SDXL ({', '.join(PIPELINES)}) are")

    def component(name: str, config: str = "config.json", required: bool = True) -> Optional[dict[str, Any]]:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            if required:
                raise CheckpointError(f"{root}: model_index.json has no {name}; the folder is incomplete")
            return None
        if name in COMPONENT_CLASSES and entry[1] not in COMPONENT_CLASSES[name]:
            raise CheckpointError(f"{root}: {name} is a {entry[1]}, not one of {', '.join(COMPONENT_CLASSES[name])}")
        path = root / name / config
        if not path.is_file():
            raise CheckpointError(f"{root}: component {name}/ is missing ({name}/{config} not found); "
                                  "re-save or re-download the folder")
        return _json(path)

    return FolderConfigs(str(root), index, component("unet"), component("vae"),
                         component("scheduler", "scheduler_config.json"), component("text_encoder", required=False),
                         component("text_encoder_2", required=False))


def folder_sampling_defaults(folder: PathLike) -> dict[str, Any]:
    """Sampling defaults a folder implies (as a model config's ``sampling:`` mapping): few-step sampling for the
    folders of LCM / TCD models; {} for others."""
    cfgs = read_configs(folder)
    sampler = FEW_STEP_SCHEDULERS.get(cfgs.scheduler.get("_class_name"))
    if sampler is None:
        return {}
    guided = cfgs.unet.get("time_cond_proj_dim") is not None
    return {"sampler": sampler, "steps": 4, "guidance_scale": 8.5 if guided else 1.0}


def folder_config(folder: PathLike) -> DictConfig:
    """Our model config (``model`` node) for a diffusers folder; see :mod:`ldm.diffusers_config`."""
    require_diffusers()
    return config_from_folder(read_configs(folder))


def folder_state_dict(folder: PathLike, model: nn.Module, node: DictConfig) -> dict[str, torch.Tensor]:
    """The folder's weights under CompVis keys for ``model`` (built from ``node``, parameters may be meta)."""
    require_diffusers()
    root = Path(folder).expanduser()
    cfgs = read_configs(root)
    slots = text_slots(model)
    configs = diffusers_configs(model, node, slots)
    for name, pad in configs["tokenizers"].items():
        check_tokenizer(root / name, pad)
    keys = KeyMap(model, slots, configs["unet"], configs["vae"])
    parts = {}
    for component in keys.pieces:
        if getattr(cfgs, component) is None:
            raise CheckpointError(f"{root} has no {component}, which the model's config needs")
        state = component_state(root, component)
        if component.startswith("text_encoder"):  # transformers >= 5 saves CLIPTextModel without "text_model."
            expected = keys.expected[component]
            state = {k if k in expected or f"text_model.{k}" not in expected else f"text_model.{k}": v
                     for k, v in state.items() if not k.endswith("position_ids")}
        keys.check(component, state, f"{root}/{component}")
        parts[component] = state
    out = keys.from_diffusers(parts)
    if (root / EXTRAS).is_file():
        extras = read_state_dict(root / EXTRAS)
        clash = sorted(set(extras) & set(out))
        if clash:
            raise CheckpointError(f"{root / EXTRAS} repeats weights the components hold ({', '.join(clash[:3])})")
        out.update(extras)
    out.update(_unmapped(model, out, slots))
    return out


def _unmapped(model: nn.Module, have: Mapping[str, torch.Tensor], slots: list[TextSlot]) -> dict[str, torch.Tensor]:
    """Values for the model's tensors a diffusers folder has no place for: buffers (noise schedule) as the model
    computed them, and OpenCLIP weights the model never uses (see the module docstring) as zeros."""
    buffers = dict(model.named_buffers())
    out = {}
    for key, value in model.state_dict().items():
        if key in have:
            continue
        if key in buffers and not value.is_meta:
            out[key] = value
        elif any(key.startswith(s.prefix) and (s.skipped(key) or key == f"{s.prefix}logit_scale") for s in slots):
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
    return out


def component_state(root: Path, component: str) -> dict[str, torch.Tensor]:
    """A component's weights: ``.safetensors`` first, then its fp16 variant, sharded indexes, then ``.bin``."""
    safe, pickled = WEIGHT_STEMS[component]
    folder = root / component
    names = [f"{safe}.safetensors", f"{safe}.safetensors.index.json", f"{safe}.fp16.safetensors",
             f"{safe}.safetensors.index.fp16.json", f"{pickled}.bin", f"{pickled}.bin.index.json",
             f"{pickled}.fp16.bin", f"{pickled}.bin.index.fp16.json"]
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".json"):
            return read_state_dict(path)
        shards = sorted(set(_json(path).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{path} lists no weight files; re-save or re-download the folder")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(folder / shard))
        return state
    raise CheckpointError(f"{folder} has no weights ({safe}.safetensors or {pickled}.bin); the folder is incomplete")


def check_tokenizer(folder: Path, pad: str) -> None:
    """A folder's tokenizer must be CLIP's BPE (77 tokens, no added words), padded with ``pad``; our encoders
    tokenize with their own copy of it. A folder without tokenizer files is fine."""
    files = ("vocab.json", "added_tokens.json", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")
    stamp = tuple((name, p.stat().st_mtime_ns, p.stat().st_size) for name in files if (p := folder / name).is_file())
    problem = _tokenizer_problem(str(folder), pad, stamp)  # parsing tokenizer.json takes a while: once per file
    if problem:
        raise CheckpointError(problem)


@functools.lru_cache(maxsize=32)
def _tokenizer_problem(where: str, pad: str, stamp: tuple) -> Optional[str]:
    from ldm.modules.encoders.tokenizer import _vocab_and_merges

    folder = Path(where)
    vocab, added = None, []
    if (folder / "vocab.json").is_file():  # transformers' slow-tokenizer files
        vocab = _json(folder / "vocab.json")
        if (folder / "added_tokens.json").is_file():
            added = list(_json(folder / "added_tokens.json").values())
    elif (folder / "tokenizer.json").is_file():  # the fast tokenizer's single file (transformers >= 5 writes only it)
        fast = _json(folder / "tokenizer.json")
        vocab = (fast.get("model") or {}).get("vocab")
        added = [t.get("id") for t in fast.get("added_tokens", []) if isinstance(t, dict)]
    if vocab is None:
        return None
    ours = _vocab_and_merges()[0]
    extra = sorted(i for i in added if isinstance(i, int) and i >= len(ours))
    if vocab != ours or extra:
        what = f"adds {len(extra)} token(s)" if vocab == ours else f"has {len(vocab)} tokens, CLIP {len(ours)}"
        return (f"{folder}: the tokenizer is not CLIP's BPE vocabulary ({what}); text encoders with another or "
                "extended tokenizer are not supported")
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            settings = {**_json(folder / name), **settings}
    found = settings.get("pad_token")
    found = found.get("content") if isinstance(found, dict) else found
    if found is not None and found != pad:
        return (f"{folder} pads prompts with {found!r}, but its text encoder's family pads with {pad!r}; "
                "this combination is not supported")
    if settings.get("model_max_length", 77) != 77:
        return f"{folder}: model_max_length {settings['model_max_length']} is not CLIP's 77"
    return None


def write_folder(state: Mapping[str, torch.Tensor], model: nn.Module, node: DictConfig, out: PathLike, *,
                 dtype: Optional[torch.dtype] = None) -> Path:
    """Write CompVis ``state`` (fitting ``model``, built from ``node``) as a diffusers folder ``out``, which must
    not exist yet; nothing is left behind on failure. Returns the folder."""
    diffusers = require_diffusers()
    out = Path(out).expanduser()
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new folder name (nothing is overwritten)")
    if not out.parent.is_dir():
        raise CheckpointError(f"cannot write {out}: directory {out.parent} does not exist; create it first")
    slots = text_slots(model)
    configs = diffusers_configs(model, node, slots)
    covered = KeyMap(model, slots, configs["unet"], configs["vae"]).covered
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    parts = to_diffusers(state, slots, configs["unet"], configs["vae"])
    pipeline_name, pipeline_kwargs = configs["pipeline"]
    pipeline = getattr(diffusers, pipeline_name)(**_components(parts, configs, slots), **pipeline_kwargs)
    extras = {k: v for k, v in state.items() if k not in covered and not k.startswith("model_ema.")}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if extras:
            save_state_dict(extras, tmp / EXTRAS, metadata={"note": "CompVis tensors with no place in diffusers' "
                                                                    "components (ldm.diffusers_folder)"})
        _sync_tree(tmp)
        os.rename(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, RuntimeError, ValueError)) and not isinstance(err, CheckpointError):
            raise CheckpointError(f"could not write {out} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                                  "nothing was written") from err
        raise
    return out


def _components(parts: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any],
                slots: list[TextSlot]) -> dict[str, Any]:
    """diffusers / transformers modules holding ``parts`` (built on the meta device, tensors assigned)."""
    import diffusers
    import transformers

    from ldm.modules.encoders.tokenizer import _tokenizer_folder

    with torch.device("meta"):
        out: dict[str, Any] = {"unet": diffusers.UNet2DConditionModel(**configs["unet"]),
                               "vae": diffusers.AutoencoderKL(**configs["vae"])}
    for slot in slots:
        fields = dict(configs[slot.component])
        cls = getattr(transformers, fields.pop("class"))
        with torch.device("meta"):
            out[slot.component] = cls(transformers.CLIPTextConfig(**fields))
    for name, module in out.items():
        _assign(module, parts[name], name)
    for name, pad in configs["tokenizers"].items():
        out[name] = transformers.CLIPTokenizer.from_pretrained(_tokenizer_folder(), pad_token=pad, model_max_length=77,
                                                               local_files_only=True)
    if "text_encoder" not in out:  # the SDXL refiner
        out.update(text_encoder=None, tokenizer=None)
    scheduler_name, scheduler_kwargs = configs["scheduler"]
    out["scheduler"] = getattr(diffusers, scheduler_name)(**scheduler_kwargs)
    return out


def _assign(module: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    own = set(module.state_dict())
    state = {k if k in own else k.removeprefix("text_model."): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        what = [f"{len(keys)} {kind} ({', '.join(keys[:3])})" for kind, keys in
                (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise CheckpointError(f"diffusers' {name} does not take the converted weights: {'; '.join(what)}")
    module.eval()


def _sync_tree(folder: Path) -> None:
    """Flush every file of a finished folder before it is renamed into place."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def folder_sha256(folder: PathLike) -> str:
    """One SHA-256 for a folder: over its files' relative paths and SHA-256s (cached per file)."""
    import hashlib

    from ldm.files import sha256_file

    root = Path(folder).expanduser()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(root).as_posix()} {sha256_file(path)}\n".encode())
    return digest.hexdigest()


def sha256_of(path: PathLike) -> str:
    """SHA-256 of a checkpoint file, or of a diffusers folder (:func:`folder_sha256`)."""
    from ldm.files import sha256_file

    return folder_sha256(path) if Path(path).is_dir() else sha256_file(path)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}); re-save or re-download the folder") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-save or re-download the folder")
    return data
