"""CompVis' training command line on top of the Hydra run: ``python main.py --base a.yaml [b.yaml] -t --gpus 0,``.

The CompVis spelling is parsed, its YAMLs are merged in order (then the trailing ``key=value`` dot-list),
and the result is translated into one of our experiments: ``model`` as it is, ``data.params`` as the data
module's arguments, ``lightning.trainer`` as Trainer options, ``lightning.callbacks`` /
``lightning.modelcheckpoint`` as our callbacks. That experiment is then run through the same Hydra entry as
``python main.py experiment=...`` (one code path, the same run folder layout). Whatever cannot be honoured
is one warning line naming the key.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from ldm.util import ConfigError

# Options of CompVis' main.py parser (short and long spellings), and the Trainer options it also accepted.
_COMPVIS_FLAGS = {"-b", "--base", "-t", "--train", "-n", "--name", "-r", "--resume", "-l", "--logdir", "-s", "--seed",
                  "--scale_lr", "--gpus", "-p", "--project", "-d", "--debug", "-f", "--postfix", "--no-test"}

DATA_TARGETS = ("main.DataModuleFromConfig", "ldm.data.datamodule.DataModuleFromConfig")
# lightning.callbacks targets -> ours (None: what our run already does on its own).
CALLBACK_TARGETS: dict[str, Optional[str]] = {
    "main.SetupCallback": None,  # run folder, config.yaml and checkpoints/ are always written
    "main.ImageLogger": "ldm.callbacks.CompVisImageLogger",
    "main.CUDACallback": "ldm.callbacks.CUDACallback",
    "main.LearningRateMonitor": "pytorch_lightning.callbacks.LearningRateMonitor",
    "pytorch_lightning.callbacks.LearningRateMonitor": "pytorch_lightning.callbacks.LearningRateMonitor",
    "pytorch_lightning.callbacks.ModelCheckpoint": "pytorch_lightning.callbacks.ModelCheckpoint",
    "main.ModelCheckpoint": "pytorch_lightning.callbacks.ModelCheckpoint",
}
# Trainer options of Lightning 1.x that CompVis configs carry, as Lightning 2 spells them.
_RENAMED_TRAINER = {"replace_sampler_ddp": "use_distributed_sampler"}
_IGNORED_TRAINER = {"weights_summary", "amp_backend", "amp_level", "progress_bar_refresh_rate", "flush_logs_every_n_steps",
                    "terminate_on_nan", "auto_select_gpus", "track_grad_norm", "prepare_data_per_node", "move_metrics_to_cpu"}


def is_compvis_argv(argv: Sequence[str]) -> bool:
    """True when the command line uses CompVis' main.py options (``--base``, ``-t``, ``--gpus`` ...)."""
    return any(a.split("=", 1)[0] in _COMPVIS_FLAGS for a in argv if a.startswith("-"))


def _str2bool(text: str) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if text.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse prints usage + message otherwise)
        raise ConfigError(f"main.py (CompVis options): {message}; see README 'Training with CompVis commands'")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="main.py", add_help=True, description="CompVis-style training (translated onto the Hydra run)")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="model/data/lightning YAMLs, merged left to right")
    p.add_argument("-t", "--train", type=_str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="run name")
    p.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?", help="run folder or .ckpt to resume")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="folder of the runs")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("--scale_lr", type=_str2bool, nargs="?", const=True, default=True,
                   help="lr = base_lr * devices * batch_size * accumulate_grad_batches")
    p.add_argument("--gpus", type=str, default=None, help="GPU indices, e.g. 0, or 0,1")
    p.add_argument("-f", "--postfix", type=str, default="", help="appended to the run name")
    p.add_argument("-p", "--project", type=str, default=None, help="(CompVis: a project folder) not supported")
    p.add_argument("-d", "--debug", type=_str2bool, nargs="?", const=True, default=False, help="(not supported)")
    p.add_argument("--no-test", type=_str2bool, nargs="?", const=True, default=False, help="(ldm never runs a test loop)")
    return p


@dataclass
class Translation:
    """Our experiment (a ``# @package _global_`` config), the Hydra overrides, and what was not honoured."""
    experiment: dict
    overrides: list[str]
    warnings: list[str] = field(default_factory=list)


def _trainer_params() -> set[str]:
    import pytorch_lightning as pl

    return set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def _devices(gpus: Any) -> list[int]:
    text = str(gpus).strip()
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--gpus {text!r}: expected GPU indices like 0, or 0,1") from None


def translate_trainer(options: dict, warn: list[str]) -> tuple[dict, dict]:
    """``lightning.trainer`` -> (our ``trainer`` section, top-level settings such as ``resume``)."""
    allowed = _trainer_params()
    trainer: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for key, value in options.items():
        if key == "gpus":
            if value in (None, "", 0, "0") and str(value) != "0,":
                continue
            devices = _devices(value) if isinstance(value, str) else value
            trainer.update(accelerator="gpu", devices=devices)
            if (len(devices) if isinstance(devices, list) else int(devices)) > 1:
                trainer.setdefault("strategy", "ddp")
        elif key in ("accelerator", "distributed_backend") and value in ("ddp", "ddp_spawn", "dp", "ddp2", "ddp_sharded"):
            trainer["strategy"] = "ddp" if value in ("dp", "ddp2", "ddp_sharded") else value
            if value != trainer["strategy"]:
                warn.append(f"lightning.trainer.{key}: {value!r} does not exist in Lightning 2; using strategy 'ddp'")
        elif key == "precision":
            trainer["precision"] = {16: "16-mixed", "16": "16-mixed", 32: "32-true", "32": "32-true", 64: "64-true",
                                    "bf16": "bf16-mixed"}.get(value, value)
        elif key == "resume_from_checkpoint":
            if value:
                top["resume"] = str(value)
        elif key == "progress_bar_refresh_rate":
            top["progress_refresh"] = int(value) if value else 10
        elif key in _RENAMED_TRAINER:
            trainer[_RENAMED_TRAINER[key]] = value
        elif key in _IGNORED_TRAINER:
            warn.append(f"lightning.trainer.{key} is a Lightning 1.x option that Lightning 2 removed; ignored")
        elif key in ("logger", "callbacks", "default_root_dir", "plugins", "enable_checkpointing"):
            warn.append(f"lightning.trainer.{key} is set by ldm's run (run folder, loggers, checkpoints); ignored")
        elif key in allowed:
            trainer[key] = value
        else:
            warn.append(f"lightning.trainer.{key} is not a pytorch_lightning.Trainer option; ignored")
    return trainer, top


def translate_checkpoint(params: dict, where: str, warn: list[str]) -> dict:
    """CompVis' default ModelCheckpoint options -> our ``checkpoint`` section."""
    ours: dict[str, Any] = {}
    for key, value in params.items():
        if key == "every_n_train_steps" and value:
            ours["every_n_train_steps"] = int(value)
        elif key == "save_top_k":
            ours["keep_all"] = int(value) < 0
            if int(value) > 1:
                warn.append(f"{where}.save_top_k={value}: ldm keeps the latest (+ last.ckpt) or all; keeping the latest")
        elif key in ("dirpath", "filename", "verbose", "save_last"):
            continue  # the run decides where checkpoints go and always keeps last.ckpt
        else:
            warn.append(f"{where}.{key} is not supported for the run's checkpoints (ldm saves every "
                        "checkpoint.every_n_train_steps); ignored")
    return ours


def translate_callbacks(callbacks: dict, warn: list[str]) -> tuple[dict, dict]:
    """``lightning.callbacks`` -> (our ``callbacks`` section, ``checkpoint`` settings)."""
    ours: dict[str, Any] = {}
    checkpoint: dict[str, Any] = {}
    for name, spec in (callbacks or {}).items():
        if not isinstance(spec, dict) or "target" not in spec:
            warn.append(f"lightning.callbacks.{name} has no target; ignored")
            continue
        target, params = str(spec["target"]), dict(spec.get("params") or {})
        if target not in CALLBACK_TARGETS:
            warn.append(f"lightning.callbacks.{name}: {target} is not supported by ldm; ignored "
                        f"(supported: {', '.join(sorted(CALLBACK_TARGETS))})")
            continue
        ours_target = CALLBACK_TARGETS[target]
        if ours_target is None:
            continue
        if ours_target.endswith("LearningRateMonitor"):
            if params.get("logging_interval", "step") == "step":
                continue  # every run logs the learning rate per step already
        if name == "checkpoint_callback" and ours_target.endswith("ModelCheckpoint"):
            checkpoint.update(translate_checkpoint(params, f"lightning.callbacks.{name}.params", warn))
            continue
        if ours_target.endswith("ModelCheckpoint"):
            params.pop("dirpath", None)  # CompVis points extra checkpoints into the run's checkpoints/ folder
        ours[name] = {"target": ours_target, "params": params}
    return ours, checkpoint


def merged_config(bases: Sequence[str], dotlist: Sequence[str]):
    from ldm.paths import bundled
    from ldm.util import load_yaml

    configs = [load_yaml(bundled(b)) for b in bases]
    try:
        cli = OmegaConf.from_dotlist(list(dotlist))
    except Exception as err:  # noqa: BLE001 - OmegaConf's grammar errors
        raise ConfigError(f"trailing key=value overrides: {str(err).splitlines()[0]}") from None
    return OmegaConf.merge(*configs, cli)


def translate(opt: argparse.Namespace, dotlist: Sequence[str]) -> Translation:
    warn: list[str] = []
    if not opt.base:
        raise ConfigError("main.py --base needs at least one YAML (model:, data:, lightning: sections)")
    config = OmegaConf.to_container(merged_config(opt.base, dotlist), resolve=True)
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"the --base configs {', '.join(opt.base)} have no model: section; add model: {{target, params}}")
    lightning = dict(config.pop("lightning", None) or {})
    data = config.pop("data", None)
    model = config.pop("model")
    for key in config:
        warn.append(f"top-level key {key!r} of the --base configs is not used by training (model, data, lightning); ignored")
    if data is None:
        raise ConfigError("the --base configs have no data: section; add data: {target: main.DataModuleFromConfig, params: ...}")
    if data.get("target") not in DATA_TARGETS:
        raise ConfigError(f"data.target {data.get('target')!r} is not supported; ldm trains from "
                          "main.DataModuleFromConfig (params: batch_size, train, validation, num_workers, wrap)")
    experiment: dict[str, Any] = {"model": model, "data": dict(data.get("params") or {}), "loggers": ["csv"]}
    trainer_options = dict(lightning.pop("trainer", None) or {})
    if opt.gpus is not None:
        trainer_options["gpus"] = opt.gpus
    trainer, top = translate_trainer(trainer_options, warn)
    trainer.setdefault("accelerator", "cpu")  # CompVis trains on the CPU unless --gpus is given
    if trainer["accelerator"] == "cpu":
        trainer.setdefault("devices", 1)
    experiment["trainer"] = trainer
    callbacks, checkpoint = translate_callbacks(lightning.pop("callbacks", None) or {}, warn)
    mc = lightning.pop("modelcheckpoint", None)
    if mc:
        checkpoint.update(translate_checkpoint(dict(mc.get("params") or {}), "lightning.modelcheckpoint.params", warn))
    if callbacks:
        experiment["callbacks"] = callbacks
    if checkpoint:
        experiment["checkpoint"] = checkpoint
    for key in lightning:
        warn.append(f"lightning.{key} is not supported by ldm; ignored")
    for flag, value, default in (("--project", opt.project, None), ("--debug", opt.debug, False)):
        if value != default:
            warn.append(f"{flag} is not supported by ldm's runs; ignored")

    name = opt.name if isinstance(opt.name, str) and opt.name else Path(opt.base[0]).stem
    overrides = [f"name={_quote(name + opt.postfix)}", f"out_dir={_quote(opt.logdir)}", f"seed={int(opt.seed)}",
                 f"scale_lr={'true' if opt.scale_lr else 'false'}"]
    resume = opt.resume if isinstance(opt.resume, str) and opt.resume else top.pop("resume", None)
    if resume:
        overrides.append(f"resume={_quote(resume)}")
    experiment.update(top)
    return Translation(experiment, overrides, warn)


def _quote(text: str) -> str:
    from ldm.run_config import hydra_quote

    return hydra_quote(str(text))


def resumed_run(resume: str) -> Translation:
    """``--resume`` without ``--base``: continue the run with the config it saved (``<run>/config.yaml``)."""
    from ldm.util import load_yaml

    path = Path(resume)
    run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {resume}: {saved} not found; pass the run's YAMLs with --base")
    config = OmegaConf.to_container(load_yaml(saved), resolve=False)
    overrides = [f"{key}={_quote(config.pop(key))}" for key in ("name", "out_dir") if key in config]
    return Translation(config, [*overrides, f"resume={_quote(resume)}"])


def run(argv: Sequence[str]) -> None:
    """Parse CompVis' command line, translate it, and run the Hydra training entry on the result."""
    from ldm.cli_errors import fail

    try:
        opt, unknown = parser().parse_known_args(_bare_switches(argv))
        for flag, value in (("--resume", opt.resume), ("--name", opt.name)):
            if value is True:
                raise ConfigError(f"{flag} needs a value")
        dotlist = [a for a in unknown if not a.startswith("-")]
        extra = [a for a in unknown if a.startswith("-")]
        trainer_flags = _trainer_flags(extra)
        if not opt.train:
            raise ConfigError("main.py without -t would only run CompVis' test loop, which ldm does not have; add -t to train")
        if opt.resume and not opt.base:
            translation = resumed_run(opt.resume)
            translation.overrides.extend(dotlist)  # keys of the saved (ldm) config, e.g. trainer.max_steps=4
        else:
            translation = translate(opt, dotlist)
        if trainer_flags:
            translation.experiment["trainer"].update(translate_trainer(trainer_flags, translation.warnings)[0])
    except ConfigError as err:
        fail(str(err).splitlines()[0])
    for line in translation.warnings:
        print(f"warning: {line}", file=sys.stderr)
    run_translation(translation)


_SWITCHES = {"-t": "--train", "--train": "--train", "-d": "--debug", "--debug": "--debug", "--scale_lr": "--scale_lr",
             "--no-test": "--no-test"}
_BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}


def _bare_switches(argv: Sequence[str]) -> list[str]:
    """``-t trainer.max_steps=4``: a switch followed by something that is not a boolean is just the switch
    (argparse would otherwise take the next word as its value)."""
    out: list[str] = []
    items = list(argv)
    for i, arg in enumerate(items):
        following = items[i + 1] if i + 1 < len(items) else None
        if arg in _SWITCHES and (following is None or following.lower() not in _BOOL_WORDS):
            out.append(f"{_SWITCHES[arg]}=true")
        else:
            out.append(arg)
    return out


def _trainer_flags(extra: Sequence[str]) -> dict:
    """``--max_steps 10`` style Trainer options (CompVis added every Trainer argument to its parser)."""
    allowed = _trainer_params() | {"gpus"}
    flags: dict[str, Any] = {}
    items = list(extra)
    while items:
        flag = items.pop(0)
        key, _, value = flag.lstrip("-").partition("=")
        if key not in allowed:
            raise ConfigError(f"unknown option {flag!r}; CompVis options are --base, -t, --gpus, -n, --resume, --logdir, "
                              "--seed, --scale_lr, --postfix, plus pytorch_lightning.Trainer options (e.g. --max_steps 100)")
        if not value:
            if not items or items[0].startswith("-"):
                raise ConfigError(f"option {flag!r} needs a value")
            value = items.pop(0)
        flags[key] = value if key == "gpus" else _plain_value(value)  # ints, floats, bools as YAML reads them
    return flags


def _plain_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_translation(translation: Translation) -> None:
    """Write the experiment into a temporary config folder and run ``main.py experiment=<it>`` through Hydra."""
    from ldm.cli import train_main
    from ldm.files import atomic_write

    with tempfile.TemporaryDirectory(prefix="ldm-compvis-") as tmp:
        name = "compvis_base"
        (Path(tmp) / "experiment").mkdir()
        body = OmegaConf.to_yaml(OmegaConf.create(translation.experiment))
        atomic_write(Path(tmp) / "experiment" / f"{name}.yaml",
                     "# @package _global_\n# translated from a CompVis main.py command line\n" + body)
        saved = sys.argv
        sys.argv = [saved[0], "--config-dir", tmp, f"experiment={name}", *translation.overrides]
        try:
            train_main()
        finally:
            sys.argv = saved
