"""Config helpers: build objects from CompVis-style ``target``/``params`` configs.

A config is data, not code. ``target`` may only name a *class* defined inside an allowlist of
modules (the model, data and loss classes of ``ldm``, ``torch.nn``, ``torch.optim``), or one of the
few factory functions listed in :data:`ALLOWED_FACTORIES`. Functions that read or write files or run
processes are never reachable from a config. Python code can trust more packages with
:func:`allow_target_prefix` (that is a decision made in code, never by a config file).

YAML files are read with :func:`load_yaml`, which refuses alias bombs ("billion laughs").
"""
from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

# Modules whose classes configs may name (prefixes end at a module boundary).
ALLOWED_MODULES: tuple[str, ...] = (
    "ldm.models", "ldm.modules", "ldm.data", "ldm.lr_scheduler", "torch.nn", "torch.optim",
)
# Functions a config may name: none so far (a factory must build an object and touch nothing else).
ALLOWED_FACTORIES: frozenset[str] = frozenset()
# Prefixes trusted from Python with allow_target_prefix (classes and functions).
_ALLOWED_PREFIXES: list[str] = []
# A YAML document may expand (through aliases) to at most this many nodes.
YAML_MAX_NODES = 100_000


class ConfigError(ValueError):
    """A config that cannot be turned into an object; the message says how to fix it."""


def allow_target_prefix(*prefixes: str) -> None:
    """Let ``target`` strings under ``prefixes`` (e.g. ``"mypkg."``) be instantiated: classes and functions.

    Only call this for code you trust: any callable under the prefix becomes reachable from configs."""
    for prefix in prefixes:
        if not prefix or prefix.strip(".") == "":
            raise ConfigError("an empty target prefix would allow everything; name a package, e.g. 'mypkg.'")
        if prefix not in _ALLOWED_PREFIXES:
            _ALLOWED_PREFIXES.append(prefix)


def allowed_target_prefixes() -> tuple[str, ...]:
    return (*ALLOWED_MODULES, *_ALLOWED_PREFIXES)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    for prefix in prefixes:
        stem = prefix.rstrip(".")
        if name == stem or name.startswith(stem + "."):
            return True
    return False


def _refuse(string: str, why: str) -> ConfigError:
    return ConfigError(f"target {string!r} {why}; configs may name classes of {', '.join(ALLOWED_MODULES)} "
                       "(or, from trusted Python code, ldm.util.allow_target_prefix('mypkg.'))")


def get_obj_from_str(string: str, reload: bool = False, allow: Iterable[str] = ()) -> Any:
    """Import ``"package.module.Name"`` and return ``Name`` if a config may build it (see the module doc)."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(f"target {string!r} is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    from ldm.aliases import TARGET_ALIASES  # published third-party names (sgm.*) that map onto ours

    string = TARGET_ALIASES.get(string, string)
    trusted = _under(string, [*_ALLOWED_PREFIXES, *allow])
    if not trusted and not _under(string, ALLOWED_MODULES) and string not in ALLOWED_FACTORIES:
        raise _refuse(string, "is outside the allowed modules")
    module_name, attr = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ImportError as err:
        raise ConfigError(f"target {string!r}: cannot import module {module_name!r} ({err})") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"target {string!r}: module {module_name!r} has no attribute {attr!r}") from None
    if trusted or string in ALLOWED_FACTORIES:
        return obj
    if not inspect.isclass(obj):
        raise _refuse(string, f"is a {type(obj).__name__}, not a class")
    if not _under(obj.__module__, ALLOWED_MODULES):  # e.g. a class imported into an ldm module from elsewhere
        raise _refuse(string, f"is {obj.__module__}.{obj.__qualname__}, defined outside the allowed modules")
    return obj


def load_yaml(path: str | os.PathLike) -> DictConfig | ListConfig:
    """Read a YAML file into OmegaConf, refusing alias bombs and unreadable files with one-line errors."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(p)!r} ({err.strerror or type(err).__name__})") from None
    try:
        _check_yaml_size(text)
        return OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except ConfigError as err:
        raise ConfigError(f"config file {str(p)!r}: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply") from None
    except Exception as err:  # YAML syntax errors carry multi-line messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from None


def _check_yaml_size(text: str) -> None:
    """Count the nodes the YAML expands to (aliases counted at full size) without building them."""
    sizes: dict[int, int] = {}
    for root in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if root is not None and _expanded_size(root, sizes, set()) > YAML_MAX_NODES:
            raise ConfigError(f"expands to more than {YAML_MAX_NODES} nodes through aliases (an alias bomb?); "
                              "write the values out instead of repeating anchors")


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError("has a recursive alias (an anchor that contains itself)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, active)
        if total > YAML_MAX_NODES:
            break
    active.discard(key)
    sizes[key] = total
    return total


def instantiate_from_config(config: Mapping[str, Any], **extra_params: Any) -> Any:
    """Build ``target(**params)`` from a mapping (dict or OmegaConf) with the CompVis schema.

    The CompVis sentinels ``"__is_first_stage__"`` and ``"__is_unconditional__"`` give ``None``.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not isinstance(config, Mapping) and not isinstance(config, DictConfig):
        raise ConfigError(f"expected a mapping with a 'target' key, got {type(config).__name__}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key (keys: {sorted(map(str, config.keys()))}); "
                          "add 'target: package.module.Class'")
    target = config["target"]
    params = config.get("params", None)
    params = {} if params is None else params
    if OmegaConf.is_config(params):  # libraries get plain dicts/lists, not OmegaConf nodes
        params = OmegaConf.to_container(params, resolve=True)
    if not isinstance(params, Mapping):
        raise ConfigError(f"params of {target!r} must be a mapping of argument names to values, "
                          f"got a {type(params).__name__}")
    params = {**params, **extra_params}
    if any(not isinstance(k, str) for k in params):
        raise ConfigError(f"params of {target!r} must have text keys (argument names)")
    cls = get_obj_from_str(target)
    _check_params(target, cls, params)
    try:
        return cls(**params)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        # Values of the wrong type or range fail deep inside constructors (torch, transformers, our own
        # asserts), with any exception type: name the config entry instead.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{target}: cannot be built from its params ({type(err).__name__}: {first}); "
                          "check their types and values") from None


def _check_params(target: str, cls: Any, params: Mapping[str, Any]) -> None:
    """Unknown or missing constructor arguments as one line, before anything is built."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no introspectable signature: the call itself reports
        return
    accepted = [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ConfigError(f"{target} has no parameter {', '.join(map(repr, unknown))} "
                              f"(it takes {', '.join(accepted) or 'none'}); check the spelling")
    try:
        signature.bind(**params)
    except TypeError as err:
        raise ConfigError(f"{target}: {err}; add it to params") from None
    for name, value in params.items():
        parameter = signature.parameters.get(name)
        want = _PRIMITIVES.get(str(parameter.annotation)) if parameter is not None else None
        if want is not None and value is not None and not _is_instance(value, want):
            raise ConfigError(f"{target}: param {name!r} must be {want[1]}, got {value!r}")


# Annotations (as written, e.g. under `from __future__ import annotations`) checked before building.
_PRIMITIVES = {"int": (int, "an integer"), "<class 'int'>": (int, "an integer"),
               "float": (float, "a number"), "<class 'float'>": (float, "a number"),
               "bool": (bool, "true or false"), "<class 'bool'>": (bool, "true or false"),
               "str": (str, "text"), "<class 'str'>": (str, "text")}


def _is_instance(value: Any, want: tuple) -> bool:
    kind = want[0]
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_config_targets(config: Any) -> None:
    """Resolve every ``target`` in a config tree and check its params, building nothing.

    A refused target or a misspelled parameter then fails before a run writes anything."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        if "target" in config:
            params = config.get("params") or {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"params of {config['target']!r} must be a mapping of argument names to values, "
                                  f"got a {type(params).__name__}")
            _check_params(str(config["target"]), get_obj_from_str(config["target"]), params)
        for value in config.values():
            check_config_targets(value)
    elif isinstance(config, (list, tuple)):
        for value in config:
            check_config_targets(value)


# ---- CompVis / SD 2 ``ldm.util`` helpers ------------------------------------------------------------

def exists(x: Any) -> bool:
    """``x is not None``."""
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` unless it is None; then ``d``, called first when it is a function (a lazy default)."""
    if exists(val):
        return val
    return d() if inspect.isfunction(d) else d


def ismap(x: Any) -> bool:
    """A [B, C, H, W] tensor with more than 3 channels (a feature / segmentation map, not an image)."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    """A [B, C, H, W] tensor with 1 or 3 channels."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over every dimension but the first (batch) one."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


def count_params(model: Any, verbose: bool = False) -> int:
    """Number of parameters of ``model``; ``verbose`` also prints it in millions."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        print(f"{model.__class__.__name__} has {total * 1.e-6:.2f} M params.")
    return total


def _caption_font(size: int) -> Any:
    """PIL's bundled default font at ``size`` pixels (scalable where PIL has FreeType); never a download."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(1, int(size)))
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font only
        return ImageFont.load_default()


def log_txt_as_img(wh: tuple[int, int], xc: Iterable[str], size: int = 10) -> torch.Tensor:
    """Captions drawn black on white: a float tensor [B, 3, H, W] in [-1, 1] for ``wh = (W, H)``.

    Lines wrap every ``40 * W / 256`` characters, as CompVis' image loggers lay them out.
    """
    from PIL import Image, ImageDraw

    width, height = int(wh[0]), int(wh[1])
    font = _caption_font(size)
    per_line = max(1, int(40 * (width / 256)))
    images = []
    for caption in xc:
        caption = str(caption)
        canvas = Image.new("RGB", (width, height), color="white")
        lines = "\n".join(caption[i:i + per_line] for i in range(0, len(caption), per_line))
        try:
            ImageDraw.Draw(canvas).text((0, 0), lines, fill="black", font=font)
        except UnicodeEncodeError:  # the bitmap fallback font is Latin-1 only: leave the image blank
            print("Cannot encode a caption for logging; skipping it.")
        images.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1).copy()))
    if not images:
        return torch.zeros(0, 3, height, width)
    return torch.stack(images) / 127.5 - 1.0


def autocast(f: Any) -> Any:
    """Decorator (SD 2): run ``f`` under CUDA autocast with the current autocast dtype and cache setting."""
    import functools

    @functools.wraps(f)
    def do_autocast(*args: Any, **kwargs: Any) -> Any:
        get_dtype = getattr(torch, "get_autocast_dtype", None)
        dtype = get_dtype("cuda") if get_dtype is not None else torch.get_autocast_gpu_dtype()
        with torch.autocast("cuda", enabled=True, dtype=dtype, cache_enabled=torch.is_autocast_cache_enabled()):
            return f(*args, **kwargs)

    return do_autocast


class AdamWwithEMAandWings(torch.optim.AdamW):
    """AdamW that also keeps an EMA of every parameter it updates (SD 2's optimizer).

    The average lives in ``optimizer.state[p]["param_exp_avg"]`` (float32); its decay warms up as
    ``min(ema_decay, 1 - step ** -ema_power)``. ``param_names`` is recorded in the param groups.
    """

    def __init__(self, params: Any, lr: float = 1.e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1.e-8,
                 weight_decay: float = 1.e-2, amsgrad: bool = False, ema_decay: float = 0.9999,
                 ema_power: float = 1., param_names: Iterable[str] = ()):
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"Invalid ema_decay value: {ema_decay}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        for group in self.param_groups:
            group.setdefault("ema_decay", ema_decay)
            group.setdefault("ema_power", ema_power)
            group.setdefault("param_names", tuple(param_names))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                n = state.get("ema_step", 0) + 1
                state["ema_step"] = n
                if "param_exp_avg" not in state:
                    state["param_exp_avg"] = p.detach().float().clone()
                    continue  # the first average is the parameter itself (decay 0 at step 1)
                decay = min(group["ema_decay"], 1 - n ** -group["ema_power"])
                state["param_exp_avg"].mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        return loss


def parallel_data_prefetch(func: Any, data: Any, n_proc: int, target_data_type: str = "ndarray",
                           cpu_intensive: bool = True, use_worker_id: bool = False) -> Any:
    """Apply ``func`` to ``n_proc`` contiguous parts of ``data`` in parallel and join the results in order.

    Processes when ``cpu_intensive`` (``func`` must then be picklable), threads otherwise;
    ``use_worker_id`` calls ``func(part, worker_id=i)``. ``target_data_type`` "ndarray" concatenates the
    parts' results along axis 0, "list" chains them, anything else returns the list of per-part results.
    """
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if isinstance(data, np.ndarray) and target_data_type == "list":
        raise ValueError("list expected but function got ndarray.")
    if isinstance(data, Mapping):
        print('WARNING: "data" passed to parallel_data_prefetch is a dict: using only its values.')
        data = list(data.values())
    if not isinstance(data, (np.ndarray, Iterable)) or isinstance(data, (str, bytes)):
        raise TypeError(f"data to process in parallel must be an np.ndarray or an iterable, got {type(data).__name__}")
    if n_proc < 1:
        raise ValueError(f"n_proc must be >= 1, got {n_proc}")
    if target_data_type == "ndarray":
        parts = list(np.array_split(np.asarray(data), n_proc))
    else:
        data = list(data)
        step = -(-len(data) // n_proc) or 1
        parts = [data[i:i + step] for i in range(0, len(data), step)]
    pool_cls = ProcessPoolExecutor if cpu_intensive else ThreadPoolExecutor
    with pool_cls(max_workers=max(1, len(parts))) as pool:
        futures = [pool.submit(func, part, worker_id=i) if use_worker_id else pool.submit(func, part)
                   for i, part in enumerate(parts)]
        results = [f.result() for f in futures]
    if target_data_type == "ndarray":
        return np.concatenate([np.asarray(r) for r in results], axis=0)
    if target_data_type == "list":
        return [item for r in results for item in r]
    return results


def images_to_bchw(x: Any) -> Any:
    """Image batches as float [B, C, H, W]; CompVis datasets yield channels-last [B, H, W, C]."""
    if x.dim() == 3:
        x = x[..., None]
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    return x.contiguous().float()


def disabled_train(self: Any, mode: bool = True) -> Any:
    """Replacement for ``Module.train`` on frozen parts: they stay in eval mode."""
    return self
