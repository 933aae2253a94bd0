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


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


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
