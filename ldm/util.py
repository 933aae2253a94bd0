"""Config helpers: build objects from CompVis-style ``target``/``params`` configs.

A config is data, not code: ``target`` may only name objects inside an allowlist of
module prefixes (``ldm.``, ``torch.`` and whatever the user adds with
:func:`allow_target_prefix`). Anything else is refused before it is imported.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterable, Mapping

from omegaconf import OmegaConf

_ALLOWED_PREFIXES: list[str] = ["ldm.", "torch."]


class ConfigError(ValueError):
    """A config that cannot be turned into an object; the message says how to fix it."""


def allow_target_prefix(*prefixes: str) -> None:
    """Let ``target`` strings under ``prefixes`` (e.g. ``"mypkg."``) be instantiated."""
    for prefix in prefixes:
        if not prefix or prefix == ".":
            raise ConfigError("an empty target prefix would allow everything; name a package, e.g. 'mypkg.'")
        if prefix not in _ALLOWED_PREFIXES:
            _ALLOWED_PREFIXES.append(prefix)


def allowed_target_prefixes() -> tuple[str, ...]:
    return tuple(_ALLOWED_PREFIXES)


def _is_allowed(target: str, extra: Iterable[str]) -> bool:
    for prefix in [*_ALLOWED_PREFIXES, *extra]:
        stem = prefix.rstrip(".")
        if target == stem or target.startswith(stem + "."):
            return True
    return False


def get_obj_from_str(string: str, reload: bool = False, allow: Iterable[str] = ()) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``, if the prefix is allowed."""
    if not isinstance(string, str) or "." not in string:
        raise ConfigError(f"target {string!r} is not a dotted path like 'ldm.models.autoencoder.AutoencoderKL'")
    if not _is_allowed(string, allow):
        raise ConfigError(
            f"target {string!r} is outside the allowed packages {list(_ALLOWED_PREFIXES) + list(allow)}; "
            f"if you trust it, call ldm.util.allow_target_prefix({string.split('.')[0] + '.'!r}) first"
        )
    module_name, attr = string.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ImportError as err:
        raise ConfigError(f"target {string!r}: cannot import module {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"target {string!r}: module {module_name!r} has no attribute {attr!r}") from None


def instantiate_from_config(config: Mapping[str, Any], **extra_params: Any) -> Any:
    """Build ``target(**params)`` from a mapping (dict or OmegaConf) with the CompVis schema.

    The CompVis sentinels ``"__is_first_stage__"`` and ``"__is_unconditional__"`` give ``None``.
    """
    if isinstance(config, str) and config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise ConfigError(f"expected a mapping with a 'target' key, got {type(config).__name__}")
    if "target" not in config:
        raise ConfigError(f"config has no 'target' key (keys: {sorted(config.keys())}); add 'target: package.module.Class'")
    params = config.get("params", None) or {}
    if OmegaConf.is_config(params):  # libraries get plain dicts/lists, not OmegaConf nodes
        params = OmegaConf.to_container(params, resolve=True)
    params = dict(params)
    params.update(extra_params)
    return get_obj_from_str(config["target"])(**params)


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
