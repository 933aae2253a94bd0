"""Safe reading and writing of Stable Diffusion checkpoints.

* ``.safetensors`` files are memory-mapped (safetensors' default ``mmap`` backend hands out
  tensors whose storage *is* the private file mapping), so a model built on the meta device and
  loaded with :func:`load_into_model` costs about one copy of the weights in RSS.
* Pickled checkpoints (``.ckpt``/``.pt``/``.pth``/``.bin``) are read with ``weights_only=True``;
  running a pickle's code needs an explicit ``allow_unsafe_pickle=True``.
* Every failure we can foresee becomes a :class:`CheckpointError` with a short message that
  names the file and the fix, instead of a traceback from safetensors, torch or pickle.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm import safe_pickle
from ldm.files import atomic_output

__all__ = [
    "CheckpointError", "read_state_dict", "read_training_checkpoint", "checkpoint_metadata", "split_ema",
    "load_into_model", "save_state_dict", "empty_init",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
_WRAPPER_KEYS = ("state_dict", "model", "module")
# weights_only errors that mean "the bytes are garbage", not "the pickle wants to run code".
_CORRUPT_PICKLE = re.compile(r"Unsupported operand|truncated|invalid load key|EOF", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, written or loaded; the message says how to fix it."""


def _first_line(err: BaseException, limit: int = 120) -> str:
    """The error's first sentence, short: library messages run on for paragraphs."""
    text = str(err).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    first = first if len(first) <= limit else first[: limit - 3] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _sniff(path: Path) -> str | None:
    """Guess the format from magic bytes: 'safetensors', 'zip' (torch.save) or 'pickle' (legacy)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # safetensors: u64 little-endian header length, then the JSON header itself.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode, used by torch's legacy format
        return "pickle"
    return None


def _check_file(path: str | os.PathLike) -> tuple[Path, str]:
    """Resolve ``path`` and its format, or raise a one-line CheckpointError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}; check the path (or download the file first)")
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory, not a checkpoint file; pass the .safetensors/.ckpt file inside it")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes), probably an interrupted download or save; "
                              "re-download or re-save it")
    try:
        kind = _sniff(p)
    except OSError as err:
        raise CheckpointError(f"cannot read {p} ({_first_line(err)}); check its permissions") from None
    if kind is None:
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            kind = "safetensors"
        elif suffix in PICKLE_SUFFIXES:
            kind = "pickle"
        else:
            raise CheckpointError(
                f"{p} is neither a safetensors file nor a torch.save checkpoint (unrecognised header); "
                "pass a .safetensors or .ckpt file")
    return p, kind


def _check_zip_crc(p: Path) -> None:
    """torch's zip reader does not verify CRCs: a flipped byte in a tensor would load silently."""
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{p} is corrupt or truncated ({_first_line(err)}); re-download or re-save it") from None
    if bad is not None:
        raise CheckpointError(f"{p} is corrupt: {bad} inside it fails its CRC check; re-download or re-save it")


def _torch_load(p: Path, kind: str, device: str | torch.device, allow_unsafe_pickle: bool) -> Any:
    if kind == "zip":
        _check_zip_crc(p)
    try:
        # mmap only works for the zip format; legacy pickles are read into memory.
        if allow_unsafe_pickle:  # explicit opt-in (ckpt_tool --unsafe-pickle / Python); configs and resume never pass it
            return torch.load(p, map_location=device, weights_only=False, mmap=kind == "zip")
        return safe_pickle.load(p, map_location=device, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        if not allow_unsafe_pickle and not _CORRUPT_PICKLE.search(str(err)):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{p} needs full unpickling{what}, which can run arbitrary code; if you trust this file, convert "
                "it once with 'scripts/ckpt_tool.py convert --unsafe-pickle FILE OUT.safetensors' "
                "(or pass allow_unsafe_pickle=True in Python) and use the .safetensors file") from None
        # Keep only the line that says what is wrong, e.g. "Unsupported operand 209".
        detail = next((ln.strip() for ln in str(err).splitlines() if _CORRUPT_PICKLE.search(ln)), "")
        raise CheckpointError(f"{p} is corrupt or truncated ({detail[:120] or _first_line(err)}); "
                              "re-download or re-save it") from None
    except (ImportError, AttributeError) as err:  # only reachable with full unpickling
        raise CheckpointError(f"{p} pickles objects whose code is not installed ({_first_line(err)}); "
                              "install that package, or use a .safetensors version of the file") from None
    except Exception as err:  # zip/EOF/OS errors from a damaged file, or anything an unsafe pickle raises
        raise CheckpointError(f"{p} is corrupt or truncated ({_first_line(err)}); re-download or re-save it") from None


def _bad_safetensors(p: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{p} is not a valid safetensors file ({_first_line(err)}); re-download or re-save it")


def _unwrap(obj: Any) -> Any:
    """Strip Lightning/CompVis ``state_dict`` and ``model``/``module`` wrappers."""
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            return obj
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            holds_tensors = isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values())
            if isinstance(inner, nn.Module) or holds_tensors or (key == "state_dict" and isinstance(inner, Mapping)):
                obj = inner
                break
        else:
            return obj
    return obj


def read_state_dict(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint (safetensors memory-mapped, pickles with ``weights_only``)."""
    p, kind = _check_file(path)
    if kind == "safetensors":
        try:
            with safe_open(p, framework="pt", device=str(device)) as f:
                raw: Any = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise _bad_safetensors(p, err) from None
    else:
        raw = _unwrap(_torch_load(p, kind, device, allow_unsafe_pickle))
    is_map = isinstance(raw, Mapping)
    sd = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if is_map else {}
    if not sd:
        found = f"top-level keys: {', '.join(map(str, list(raw)[:6]))}" if is_map and raw else f"a {type(raw).__name__}"
        raise CheckpointError(f"{p} contains no tensors ({found}); it is not a model checkpoint, pass the weights file")
    return sd


def read_training_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning training checkpoint (the dict ``trainer.save_checkpoint`` writes), read without running code."""
    p, kind = _check_file(path)
    if kind == "safetensors":
        raise CheckpointError(f"{p} is a safetensors weights file, not a training checkpoint (it has no optimizer or "
                              "loop state); to start a new run from its weights use init_from=FILE")
    obj = _torch_load(p, kind, map_location if map_location is not None else "cpu", False)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping) or "global_step" not in obj:
        raise CheckpointError(f"{p} is not a Lightning training checkpoint (no state_dict/global_step); "
                              "resume from a run folder or its checkpoints/last.ckpt")
    return dict(obj)


def checkpoint_metadata(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False) -> dict[str, Any]:
    """Non-tensor information: safetensors' header metadata, or a pickle's scalars (``global_step``...)."""
    p, kind = _check_file(path)
    if kind == "safetensors":
        try:
            with safe_open(p, framework="pt") as f:
                return dict(f.metadata() or {})
        except Exception as err:
            raise _bad_safetensors(p, err) from None
    obj = _torch_load(p, kind, "cpu", allow_unsafe_pickle)
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}


def split_ema(state_dict: Mapping[str, torch.Tensor], model_param_names: Iterable[str],
              use_ema: bool) -> dict[str, torch.Tensor]:
    """Resolve CompVis' ``LitEma`` layout: EMA values replace ``model.*`` weights if ``use_ema``.

    ``LitEma`` names each buffer ``model_ema.`` + the parameter's path inside ``model`` without dots.
    Parameters without a buffer (``LitEma`` skips frozen ones) keep their raw value.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    if not use_ema:
        return out
    ema = {k[len(EMA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    found = 0
    for name in model_param_names:
        if name.startswith("model.") and (shadow := ema.get(name[len("model."):].replace(".", ""))) is not None:
            out[name] = shadow
            found += 1
    if not found:
        why = ("has no model_ema.* keys" if not set(ema) - {"decay", "num_updates"}
               else "has model_ema.* keys matching none of the model's parameters")
        raise CheckpointError(f"checkpoint {why} (no EMA weights); load it with use_ema=False")
    return out


def _matches(key: str, patterns: list[str]) -> bool:
    # Patterns without wildcards act as prefixes, like CompVis' ignore_keys.
    return any(fnmatch.fnmatchcase(key, p) if any(c in p for c in "*?[") else key.startswith(p) for p in patterns)


def _grouped(keys: Iterable[str], limit: int = 8) -> list[str]:
    """Summarise keys as '<first 3 dotted parts>.* (N keys, e.g. ...)' lines, biggest groups first."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        parts = k.split(".")
        groups.setdefault(".".join(parts[:min(3, max(1, len(parts) - 1))]), []).append(k)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    lines = [f"    {g}.* ({len(v)} keys, e.g. {v[0]})" if len(v) > 1 else f"    {v[0]}" for g, v in ordered[:limit]]
    if len(ordered) > limit:
        rest = ordered[limit:]
        lines.append(f"    ... and {len(rest)} more groups ({sum(len(v) for _, v in rest)} keys)")
    return lines


GUIDANCE_INPUT_KEY = "model.diffusion_model.time_embedding.cond_proj.weight"  # guidance-distilled (LCM) UNets


def _raise_on_mismatch(model: nn.Module, missing: list[str], unexpected: list[str], shapes: list[str],
                       strict: bool, hint: str = "") -> None:
    if not shapes and not (strict and (missing or unexpected)):
        return
    counts = ", ".join(f"{n} {what}" for n, what in [(len(missing), "missing"), (len(unexpected), "unexpected"),
                                                      (len(shapes), "shape mismatches")] if n)
    lines = [f"checkpoint does not match {type(model).__name__} ({counts}); use the matching config/file, "
             f"or pass ignore_keys / strict=False if this is intended{hint}"]
    if strict and missing:
        lines += [f"  missing from file ({len(missing)}):", *_grouped(missing)]
    if strict and unexpected:
        lines += [f"  unexpected in file ({len(unexpected)}):", *_grouped(unexpected)]
    if shapes:
        lines += [f"  shape mismatches ({len(shapes)}):", *(f"    {s}" for s in shapes[:5])]
        lines += [f"    ... and {len(shapes) - 5} more"] if len(shapes) > 5 else []
    raise CheckpointError("\n".join(lines))


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                     ignore_keys: Iterable[str] = (), optional_keys: Iterable[str] = ()) -> tuple[dict, dict]:
    """Raise CheckpointError (grouped, readable) unless keys and shapes fit ``model``; loads nothing.

    Returns (the model's entries, the file's entries that apply)."""
    ignore, optional = list(ignore_keys), list(optional_keys)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if not _matches(k, ignore)}
    sd = {k: v for k, v in state_dict.items()
          if not _matches(k, ignore) and (k in expected or not _matches(k, optional))}
    missing = [k for k in expected if k not in sd and not _matches(k, optional)]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    hint = ""
    if GUIDANCE_INPUT_KEY in unexpected:
        hint = (f"; the file is a guidance-distilled (LCM) model: its config needs time_cond_proj_dim: "
                f"{sd[GUIDANCE_INPUT_KEY].shape[-1]} in the UNet's params (SD 1.x: "
                "configs/stable-diffusion/v1-lcm-inference.yaml)")
    _raise_on_mismatch(model, missing, unexpected, shapes, strict, hint)
    return expected, sd


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN / inf, in one reduction: a NaN or inf anywhere makes the float32 (or
    float64) sum non-finite; only a sum that overflows on finite values takes the exact elementwise check. About
    4x faster than ``isfinite(t).all()`` on a CPU (no boolean copy of the tensor)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def check_values(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming the tensor, a non-float value where the model has a float one, and NaN / inf values."""
    for k, v in state_dict.items():
        ref = expected.get(k)
        if ref is not None and ref.is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"tensor {k!r} is {str(v.dtype).replace('torch.', '')} but the model expects floating "
                                  "point weights; the file was not written for this model (or is damaged)")
        if v.is_floating_point() and not v.is_meta and v.numel() and not all_finite(v):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(f"tensor {k!r} holds {bad} NaN/inf value(s) of {v.numel()}; the file is damaged or "
                                  "its training diverged: use another checkpoint")


def load_into_model(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True,
                    dtype: torch.dtype | None = None, ignore_keys: Iterable[str] = (),
                    optional_keys: Iterable[str] = ()) -> None:
    """Assign ``state_dict`` to ``model`` (which may live on the meta device) after checking it.

    Floating tensors are cast to ``dtype``, or else to the dtype of the model tensor they replace;
    they move to that tensor's device unless it is meta (then they stay where they were read).
    A model with ``restore_schedule_precision`` (DDPM / LatentDiffusion) then gets a half-precision file's
    rounded noise schedule back in float32.
    """
    ignore, optional = list(ignore_keys), list(optional_keys)
    expected, sd = check_state_dict(model, state_dict, strict=strict, ignore_keys=ignore, optional_keys=optional)
    check_values(sd, expected)
    buffers = {n for n, _ in model.named_buffers()}
    for k, v in list(sd.items()):
        ref = expected.get(k)
        to_dtype = v.dtype
        if v.is_floating_point():
            own = ref.dtype if ref is not None and ref.is_floating_point() else v.dtype
            to_dtype = dtype if dtype is not None else own
        to_device = ref.device if ref is not None and ref.device.type != "meta" else v.device
        if v.dtype != to_dtype or v.device != to_device:
            sd[k] = v.to(device=to_device, dtype=to_dtype)
        elif k in buffers:
            # A safetensors tensor is a view of the file's one memory map: a small buffer (the noise schedule)
            # left on it would keep the whole mapping, and every page read, resident after the weights are
            # converted (bf16: 4 GiB of fp32 pages kept for SD 1.x). Buffers get their own memory.
            sd[k] = v.clone()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    # torch's own strict check would reject optional keys; ours ran above, re-check what it reports.
    result = model.load_state_dict(sd, strict=False, assign=True)
    _raise_on_mismatch(model, [k for k in result.missing_keys if not _matches(k, optional + ignore)],
                       result.unexpected_keys, [], strict)
    for n, p in model.named_parameters():
        p.requires_grad_(grads.get(n, p.requires_grad))  # assign=True must not change trainability
    _check_materialised(model)
    restore = getattr(model, "restore_schedule_precision", None)
    if callable(restore):  # diffusion models: a half-precision file's rounded noise schedule back in float32
        restore({k: v.dtype for k, v in state_dict.items()})


def _check_materialised(model: nn.Module) -> None:
    still_meta, non_persistent = [], []
    for mod_name, mod in model.named_modules():
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None and t.is_meta:
                full = f"{mod_name}.{name}" if mod_name else name
                (non_persistent if name in mod._non_persistent_buffers_set else still_meta).append(full)
    if not still_meta and not non_persistent:
        return
    parts = []
    if still_meta:
        parts.append(f"{len(still_meta)} tensors got no value from the checkpoint ({', '.join(still_meta[:5])}"
                     f"{', ...' if len(still_meta) > 5 else ''}); load with strict=True to see why")
    if non_persistent:
        more = ", ..." if len(non_persistent) > 8 else ""
        parts.append(f"non-persistent buffers {', '.join(non_persistent[:8])}{more} are not in checkpoints, so build "
                     "the model under empty_init() (buffers on CPU), not torch.device('meta')")
    raise CheckpointError("model still has meta tensors after loading: " + "; ".join(parts))


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Atomically write ``state_dict`` as ``.safetensors`` (default) or a ``.ckpt`` pickle."""
    p = Path(path).expanduser()
    sd: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for k, v in state_dict.items():
        if v.is_meta:
            raise CheckpointError(f"cannot save {p}: tensor {k!r} is on the meta device (never loaded); "
                                  "load the weights first")
        v = v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        storage = (v.device, v.untyped_storage().data_ptr())
        if storage in seen and v.numel():
            v = v.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen.add(storage)
        sd[k] = v
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if not p.parent.is_dir():
        raise CheckpointError(f"cannot save {p}: directory {p.parent} does not exist; create it first")
    try:
        with atomic_output(p) as tmp:
            if p.suffix.lower() in PICKLE_SUFFIXES:
                torch.save({"state_dict": sd, **meta}, tmp)
            else:
                save_file(sd, str(tmp), metadata=meta or None)
    except Exception as err:
        raise CheckpointError(f"could not save {p} ({_first_line(err)}); "
                              "the previous file, if any, is unchanged") from err


@contextlib.contextmanager
def empty_init() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers on CPU.

    Parameters cost neither memory nor init time (``reset_parameters`` then runs on meta tensors, and a
    transformers model whose parameters are all meta skips its random init but still ties its weights);
    buffers keep real values because non-persistent ones (position ids, masks) are not in checkpoints.
    Not thread-safe: it patches ``nn.Module.register_parameter`` while active.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if type(param) is nn.Parameter and not param.is_meta:
            # The just-created CPU tensor is freed untouched (malloc'd pages never get resident).
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        with _no_random_init_of_meta_transformers():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _no_random_init_of_meta_transformers() -> Iterator[None]:
    """transformers' ``post_init`` draws every weight of a new model at random, through torch's Python reference
    ops on meta tensors (0.1 s for CLIP ViT-L's text tower, for values the checkpoint replaces). Skip that draw
    where every parameter is meta; weight tying, the rest of ``init_weights``' job, still runs."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a requirement
        yield
        return
    original = PreTrainedModel.init_weights

    def init_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
        if any(not p.is_meta for p in self.parameters()):
            return original(self, *args, **kwargs)
        self.tie_weights()
        return None

    PreTrainedModel.init_weights = init_weights  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original  # type: ignore[method-assign]
