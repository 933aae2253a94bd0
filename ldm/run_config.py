"""What the generation scripts share around ``generate``: CompVis flags -> Hydra overrides, the model
(explicit or the bundled demo) and its sampling defaults, prompts, per-image seeds, PNG metadata.

    translate_argv("txt2img", ["--prompt", "a cat, sitting", "--ddim_steps", "20", "--plms"])
    # -> ["prompt='a cat, sitting'", "steps=20", "sampler=plms"]
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint import CheckpointError
from ldm.paths import bundled
from ldm import settings as declaration
from ldm.settings import TASKS  # noqa: F401  (re-exported for the scripts)
from ldm.util import ConfigError, load_yaml

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "digits_demo"
DEMO_CONFIG, DEMO_CKPT = DEMO_DIR / "config.yaml", DEMO_DIR / "model.safetensors"
README_TABLE = "the checkpoint/config table in README.md ('Load an official checkpoint')"

IGNORED_FLAGS = ("C", "f")  # CompVis latent channels / downsampling factor: read from the model config
# Hydra's own command-line flags, passed through untouched; the value-taking ones with their next token.
HYDRA_FLAGS = {"--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m",
               "--shell-completion", "-sc"}
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                     "-cd", "--info", "-i", "--experimental-rerun"}


class Settings(dict):
    """A run's settings as plain Python values: attribute access, and never an interpolation.

    User data (prompts, file names, PNG recipes) is literal text: a ``${...}`` in it is kept as is,
    where an OmegaConf node would resolve it (``${oc.env:HOME}``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def copy(self) -> "Settings":
        return Settings(self)


def literal_settings(cfg: Mapping[str, Any]) -> Settings:
    """The (Hydra-composed) run config as :class:`Settings`, without Hydra's own ``hydra:`` node."""
    out = Settings()
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]  # the composed config's own interpolations resolve here, user text is escaped
        out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return out


def omegaconf_literal(text: str) -> str:
    """``text`` escaped so OmegaConf reads it back unchanged (``${`` is not an interpolation)."""
    return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


def settings_yaml(settings: Mapping[str, Any]) -> str:
    """YAML of ``settings`` that OmegaConf/Hydra load back to the same literal values."""
    def escape(value: Any) -> Any:
        if isinstance(value, str):
            return omegaconf_literal(value)
        if isinstance(value, dict):
            return {k: escape(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escape(v) for v in value]
        return value

    return OmegaConf.to_yaml(OmegaConf.create(escape(dict(settings))))


def hydra_quote(text: str) -> str:
    """``text`` as a Hydra override value that reaches the config unchanged (spaces, commas, quotes, ``${``)."""
    text = omegaconf_literal(text)
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)  # Hydra: backslashes before a quote/the end
    return "'" + text.replace("'", "\\'") + "'"


def translate_argv(task: str, argv: Sequence[str]) -> list[str]:
    """CompVis-style ``--flag value`` / ``--flag=value`` arguments as Hydra ``key=value`` overrides.

    Flags, value types and switches come from the settings declaration (:mod:`ldm.settings`);
    ``--help`` prints that declaration and exits."""
    settings = declaration.by_name(task)
    flags, switches = declaration.flag_names(task), declaration.switches(task)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    out: list[str] = []
    joined: dict[str, list[str]] = {}  # settings whose repeated flag values are joined (--embedding a --embedding b)
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--help", "-h"):
            print(declaration.help_text(task))
            raise SystemExit(0)
        if not arg.startswith("-"):
            out.append(_passthrough(task, settings, arg, multirun))
            continue
        name, has_value, value = arg.partition("=")
        if name in HYDRA_FLAGS | HYDRA_VALUE_FLAGS:
            out.append(arg)
            if name in HYDRA_VALUE_FLAGS and not has_value and i < len(args) and not args[i].startswith("-"):
                out.append(args[i])
                i += 1
            continue
        flag = name.lstrip("-")
        if flag in IGNORED_FLAGS:
            if not has_value and i < len(args):
                i += 1  # skip its value
            continue
        if flag in switches and not has_value:
            key, switched = switches[flag]
            out.append(f"{key}={_typed(settings[key], str(switched), name)}")
            continue
        key = flags.get(flag)
        if key is None:
            other = flag in declaration.flag_names()
            raise ValueError(f"unknown option {name}" + (f" (not an option of {task})" if other else "; see --help"))
        if not has_value:
            if settings[key].kind is bool:
                value = "true"
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise ValueError(f"{name} needs a value")
        if settings[key].spec.joins is not None:
            if key not in joined:
                out.append(key)  # placeholder, replaced below by the joined values
            joined.setdefault(key, []).append(value)
            continue
        out.append(f"{key}={_typed(settings[key], value, name)}")
    for key, values in joined.items():
        out[out.index(key)] = f"{key}={_typed(settings[key], settings[key].spec.joins.join(values), key)}"
    return out


def _passthrough(task: str, settings: Mapping[str, declaration.Declared], arg: str, multirun: bool) -> str:
    """A Hydra ``key=value`` override: values are type-checked and text stays literal (quotes, commas and
    ``${`` included), except sweeps (``seed=1,2``, ``range(3)``), kept for ``-m``."""
    key, eq, value = arg.partition("=")
    bare = key.lstrip("+~")
    if not eq and not key.startswith("~"):
        raise ValueError(f"unexpected argument {arg!r}; options are --flag value or key=value (e.g. --prompt {arg!r})")
    if not eq or bare.startswith(("hydra.", "hydra/")):
        return arg
    if bare not in settings:
        raise ValueError(f"unknown setting {bare!r} for {task}; known: {', '.join(sorted(settings))}")
    d = settings[bare]
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    if quoted and d.kind is str:  # Hydra would resolve ${...} inside quotes: user text stays literal
        return f"{key}={omegaconf_literal(value)}"
    if quoted or (d.kind is str and d.spec.choices is not None):
        return arg
    try:
        return f"{key}={_typed(d, value, bare)}"
    except ValueError:
        if multirun and ("," in value or "(" in value):  # a sweep: Hydra checks it
            return arg
        raise


def _typed(d: declaration.Declared, value: str, name: str) -> str:
    """``value`` checked against the setting's declared type, in override syntax; one-line error if bad."""
    if value.strip() == "null":
        if not d.nullable:
            raise ValueError(f"{name} cannot be null; give a value (default {d.default!r})")
        return "null"
    if d.kind is str:
        return hydra_quote(str(d.spec.value_aliases.get(value, value)))
    if d.kind is list:  # a (height, width) / (top, left) pair: "1024,768", "1024x768" or "[1024, 768]"
        parts = [v for v in re.split(r"[,x\s]+", value.strip().strip("[]()")) if v]
        if len(parts) != 2 or not all(v.isdigit() for v in parts):
            raise ValueError(f"{name} expects two non-negative integers like 1024,1024, got {value!r}")
        return f"[{int(parts[0])},{int(parts[1])}]"
    if d.kind is bool:
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return "true"
        if lowered in ("false", "0", "no", "off"):
            return "false"
        raise ValueError(f"{name} expects true or false, got {value!r}")
    try:
        return str(d.kind(value))
    except ValueError:
        raise ValueError(f"{name} expects {'an integer' if d.kind is int else 'a number'}, got {value!r}") from None


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The setting names a list of Hydra overrides sets (``+``/``~`` prefixes dropped)."""
    return {str(o).partition("=")[0].lstrip("+~") for o in overrides}


def resolve_model(config: Optional[str], ckpt: Optional[str]) -> tuple[Path, Path]:
    """(config, checkpoint) paths, absolute: as given, or the bundled demo model when neither is."""
    if config is None and ckpt is None:
        if not (DEMO_CONFIG.is_file() and DEMO_CKPT.is_file()):
            raise ConfigError(f"no model given and the bundled demo model ({DEMO_CKPT}) is not installed; "
                              "pass --ckpt and --config")
        return DEMO_CONFIG, DEMO_CKPT
    if ckpt is not None and Path(ckpt).expanduser().is_dir():  # a diffusers folder carries its own config
        config = ckpt if config is None else config
    if config is None:
        raise ConfigError(f"--ckpt needs --config, the model YAML that matches it; see {README_TABLE}")
    if ckpt is None:
        raise ConfigError(f"--config needs --ckpt, the weights to sample from; see {README_TABLE}")
    config_path = bundled(Path(config).expanduser()).absolute()  # "configs/..." also names a bundled config
    ckpt_path = Path(ckpt).expanduser().absolute()
    if ckpt_path.is_dir():
        from ldm.diffusers_folder import read_configs

        read_configs(ckpt_path)  # a wrong or incomplete folder fails here, in one line
        if config_path == ckpt_path:
            return config_path, ckpt_path
    if not config_path.is_file():
        raise ConfigError(f"config file {config!r} not found; pass the model YAML, see {README_TABLE}")
    if not ckpt_path.is_file() and not ckpt_path.is_dir():
        raise CheckpointError(f"checkpoint not found: {ckpt}; check the path")
    return config_path, ckpt_path


def model_sampling_defaults(config_path: Path) -> dict[str, Any]:
    """The ``sampling:`` mapping of a model config (e.g. the demo's native size and steps), or {}."""
    if config_path.is_dir():  # a diffusers folder: few-step sampling for LCM / TCD folders
        from ldm.diffusers_folder import folder_sampling_defaults

        return folder_sampling_defaults(config_path)
    cfg = load_yaml(config_path)
    node = cfg.get("sampling") if isinstance(cfg, DictConfig) else None
    if node is None:
        return {}
    defaults = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    allowed = [d.name for d in declaration.declared() if d.spec.model_default]
    if not isinstance(defaults, dict) or set(defaults) - set(allowed):
        raise ConfigError(f"'sampling:' in {config_path} must map some of {', '.join(allowed)} to values")
    found = declaration.problems(defaults)
    if found:
        raise ConfigError(f"'sampling:' in {config_path}: {'; '.join(found)}")
    return defaults


def apply_model_defaults(settings: Settings, defaults: Mapping[str, Any], user_keys: Iterable[str]) -> Settings:
    """A copy of ``settings`` taking ``defaults`` for the keys it has that the user did not set."""
    out = settings.copy()
    given = set(user_keys)
    for key, value in defaults.items():
        if key in out and key not in given:
            out[key] = value
    return out


def apply_regeneration(settings: Settings, meta: Mapping[str, Any], task: str, source: str = "the PNG") -> Settings:
    """A copy of ``settings`` that reproduces the one image ``meta`` describes (only outdir/device stay the user's).

    Recorded values are type-checked against the declaration and taken as literal text."""
    missing = [k for k in ("prompt", "seed", "config", "ckpt", "model_sha256") if meta.get(k) is None]
    if missing:
        raise ValueError(f"the PNG's metadata lacks {', '.join(missing)}; it cannot be regenerated")
    if not isinstance(meta["model_sha256"], str):
        raise ValueError(f"{source}: recipe field 'model_sha256' must be text; the PNG's metadata was altered")
    declaration.check_recipe(meta, task, source)
    out = settings.copy()
    for key in declaration.recipe_fields(task):
        if key in out and key in meta:
            out[key] = meta[key]
        elif key in out and (spec := declaration.by_name(task)[key].spec).recipe_absent_set:
            out[key] = spec.recipe_absent  # recorded before the setting existed: what it did then
    out.update(from_file=None, n_samples=1, n_iter=1, fixed_code=False, skip_grid=True, skip_save=False)
    return out


def read_prompts(prompt: Optional[str], from_file: Optional[str]) -> list[str]:
    """The run's prompts: ``prompt``, or one per non-empty line of ``from_file``."""
    if prompt is not None and from_file is not None:
        raise ValueError("give --prompt or --from-file, not both")
    if from_file is not None:
        path = Path(from_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {from_file!r} not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot read prompt file {from_file!r}: {type(err).__name__}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {from_file!r} has no prompts (it is empty or only whitespace)")
        return prompts
    if prompt is None or not str(prompt).strip():
        raise ValueError("no prompt; pass --prompt TEXT or --from-file FILE (one prompt per line)")
    return [str(prompt)]


def image_seeds(seed: int, count: int, fixed_code: bool = False) -> list[int]:
    """Seed of each image of a run: ``seed + k`` for image k (all prompts, samples, iterations), or all ``seed``."""
    return [seed] * count if fixed_code else [seed + k for k in range(count)]


@functools.lru_cache(maxsize=None)
def ldm_version() -> str:
    """Package version, plus the git commit of a source checkout (read from .git, no git process)."""
    try:
        version = importlib.metadata.version("ldm")
    except importlib.metadata.PackageNotFoundError:
        import ldm

        version = getattr(ldm, "__version__", "0.0.0")
    commit = _git_commit(Path(__file__).resolve().parents[1] / ".git")
    return f"{version}+g{commit[:10]}" if commit else version


def _git_commit(git_dir: Path) -> Optional[str]:
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git_dir / ref).is_file():
            return (git_dir / ref).read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def build_metadata(task: str, settings: Mapping[str, Any], *, prompt: str, seed: int, config: Path, ckpt: Path,
                   model_sha256: str, inputs: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Everything needed to reproduce one image, as recorded in its PNG: the declared recipe fields."""
    meta = {key: settings.get(key) for key in declaration.recipe_fields(task)}
    meta.update(prompt=prompt, seed=seed, config=str(config), ckpt=str(ckpt), model_sha256=model_sha256,
                ldm_version=ldm_version(), script=task, **dict(inputs or {}))
    return meta


def check_outdir(outdir: str) -> Path:
    """The output folder, if it is (or can be made) a writable directory; checked before anything is written."""
    path = Path(os.path.expanduser(outdir))
    if path.exists() and not path.is_dir():
        raise ValueError(f"outdir {outdir!r} exists and is not a directory")
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"outdir {outdir!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"outdir {outdir!r} is not writable ({str(existing)!r} does not allow it); choose another --outdir")
    return path
