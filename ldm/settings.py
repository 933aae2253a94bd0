"""The generation settings, declared once.

Every field of :class:`SamplingSettings` (what :func:`ldm.generation.generate` needs) and of
:class:`RunSettings` (what a script run adds) carries its type, default, valid values, CompVis flag
spellings, per-task defaults and whether the PNG recipe records it. The rest derives from here:

* the Hydra schema of ``scripts/txt2img.py`` / ``img2img.py`` / ``inpaint.py`` (:func:`register_configs`),
* the CompVis flag translation and ``--help`` (:mod:`ldm.run_config`),
* validation, with one message per problem (:func:`problems`, :func:`validate`),
* the PNG recipe and ``--regenerate`` (:func:`recipe_fields`, :func:`check_recipe`).

Adding a setting = one field here, the code that uses it, and a test.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ldm.models.diffusion.sampling.core import MAX_SEED
from ldm.modules.tome import LAYERS as TOME_LAYERS
from ldm.modules.tome import MAX_DOWNSAMPLES as TOME_MAX_DOWNSAMPLES
from ldm.modules.tome import MAX_RATIO as TOME_MAX_RATIO

TASKS = ("txt2img", "img2img", "inpaint", "upscale", "depth2img")
APPROX_TASKS = ("txt2img", "img2img", "inpaint", "depth2img")  # not the x4 upscaler (tiles, own sampling)
Check = Callable[[Any], Optional[str]]  # returns what is wrong with a value, or None


@dataclass(frozen=True)
class Spec:
    """What the declaration says about one setting besides its type and default."""

    help: str
    flags: tuple[str, ...] = ()  # CompVis spellings besides --name (e.g. --ddim_steps)
    switches: Mapping[str, Any] = field(default_factory=dict)  # value-less flags: {"plms": "plms"}
    check: Optional[Check] = None
    choices: Optional[Callable[[], Sequence[str]]] = None
    value_aliases: Mapping[str, Any] = field(default_factory=dict)  # e.g. precision "full" -> "fp32"
    recipe: bool = True  # recorded in each PNG and restored by --regenerate
    tasks: tuple[str, ...] = TASKS
    task_defaults: Mapping[str, Any] = field(default_factory=dict)
    model_default: bool = False  # a model config's top-level ``sampling:`` mapping may set it
    recipe_absent: Any = None  # with recipe_absent_set: the value a recipe that does not record it implies
    recipe_absent_set: bool = False  # (a setting added later whose default would change older images)
    joins: Optional[str] = None  # a flag given several times: its values joined by this text (e.g. ";")


def setting(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(help=help, **spec)})


def finite(value: float) -> Optional[str]:
    return None if math.isfinite(value) else f"must be a finite number, got {value}"


def between(low: float, high: float) -> Check:
    return lambda v: finite(v) or (None if low <= v <= high else f"must be in [{low}, {high}], got {v}")


def at_least(low: float) -> Check:
    return lambda v: finite(v) or (None if v >= low else f"must be at least {low}, got {v}")


def one_of(*allowed: Any) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(map(str, allowed))}, got {v}"


def image_side(value: int) -> Optional[str]:
    if value > 0 and value % 8 == 0:
        return None
    return f"must be a positive multiple of 8, got {value} (try {max(8, round(value / 8) * 8)})"


def pair(value: list) -> Optional[str]:
    if len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return f"must be two non-negative integers (height, width / top, left), got {value!r}"


def _sampler_names() -> list[str]:
    from ldm.models.diffusion.sampling import sampler_names

    return sampler_names()


def _discretizations() -> list[str]:
    from ldm.models.diffusion.sampling import DISCRETIZATIONS

    return list(DISCRETIZATIONS)


PRECISIONS = ("fp32", "bf16", "fp16", "autocast")


def _precisions() -> list[str]:
    return list(PRECISIONS)


@dataclass
class SamplingSettings:
    """How images are sampled: what :func:`ldm.generation.generate` takes."""

    negative_prompt: str = setting("", "what to steer away from (classifier-free guidance's unconditional side)",
                                   flags=("neg",), model_default=True)
    prompt_weighting: bool = setting(True, "read AUTOMATIC1111's weighting syntax in prompts: (word) x1.1, [word] "
                                     "/1.1, (word:1.3), \\( for a literal bracket, BREAK for a new 75-token window; "
                                     "false = brackets are plain text. Images made before this setting existed "
                                     "regenerate without it", recipe_absent=False, recipe_absent_set=True)
    sampler: str = setting("ddim", "the solver", switches={"plms": "plms"}, choices=_sampler_names,
                           model_default=True)
    steps: int = setting(50, "number of denoising steps", flags=("ddim_steps",), check=at_least(1), model_default=True)
    guidance_scale: float = setting(7.5, "classifier-free guidance scale (1 = no guidance); guidance-distilled "
                                    "(LCM) models take it as an input instead", flags=("scale",),
                                    check=finite, model_default=True)
    guidance_rescale: float = setting(0.0, "rescale guided predictions towards the conditional one's std (0 = off)",
                                      check=between(0, 1), model_default=True)
    eta: Optional[float] = setting(None, "noise of stochastic samplers (ddim: 0 deterministic, 1 DDPM-like); "
                                   "null = the sampler's own", flags=("ddim_eta",), check=at_least(0),
                                   model_default=True)
    discretization: Optional[str] = setting(None, "timestep spacing; null = the sampler's own",
                                            choices=_discretizations, model_default=True)
    height: Optional[int] = setting(512, "image height (multiple of 8); img2img/inpaint/depth2img: null = the init "
                                    "image's; upscale: the output's, null = 4x the input's", flags=("H",),
                                    check=image_side, model_default=True,
                                    task_defaults={"img2img": None, "inpaint": None, "upscale": None, "depth2img": None})
    width: Optional[int] = setting(512, "image width (multiple of 8); img2img/inpaint/depth2img: null = the init "
                                   "image's; upscale: the output's, null = 4x the input's", flags=("W",),
                                   check=image_side, model_default=True,
                                   task_defaults={"img2img": None, "inpaint": None, "upscale": None, "depth2img": None})
    strength: float = setting(0.75, "img2img/depth2img: how much to change the image (0 = keep, 1 = ignore it; "
                              "depth2img keeps its depth)", check=between(0, 1), tasks=("img2img", "depth2img"),
                              model_default=True)
    noise_level: int = setting(20, "upscale: noise added to the low-res input before the model sees it (0 = none, up to "
                               "the model's max_noise_level, 350 for SD 2 x4); more lets it invent more detail",
                               check=at_least(0), tasks=("upscale",), model_default=True)
    upscale_tile_size: Optional[int] = setting(256, "upscale: inputs larger than this many pixels a side are denoised in "
                                               "overlapping tiles (a quarter overlap) blended in latent space at every "
                                               "step; null = never tile", check=at_least(16), tasks=("upscale",))
    # SDXL: a prompt per text encoder and micro-conditioning (diffusers' defaults); other models ignore them.
    prompt_2: Optional[str] = setting(None, "SDXL: the prompt for the second text encoder (OpenCLIP); null = prompt")
    negative_prompt_2: Optional[str] = setting(None, "SDXL: negative prompt for the second text encoder; "
                                               "null = negative_prompt")
    original_size: Optional[list[int]] = setting(None, "SDXL: (height, width) the image claims to come from; "
                                                 "null = the output size", check=pair)
    target_size: Optional[list[int]] = setting(None, "SDXL: (height, width) conditioning; null = the output size",
                                               check=pair)
    crops_coords_top_left: list[int] = setting((0, 0), "SDXL: (top, left) crop conditioning", check=pair)
    negative_original_size: Optional[list[int]] = setting(None, "SDXL: original_size of the negative side (used, as "
                                                          "in diffusers, only with negative_target_size)", check=pair)
    negative_target_size: Optional[list[int]] = setting(None, "SDXL: target_size of the negative side (used only "
                                                        "with negative_original_size)", check=pair)
    negative_crops_coords_top_left: Optional[list[int]] = setting(None, "SDXL: crop of the negative side when it has "
                                                                  "its own sizes; null = (0, 0)", check=pair)
    aesthetic_score: float = setting(6.0, "SDXL refiner: aesthetic score conditioning", check=finite)
    negative_aesthetic_score: float = setting(2.5, "SDXL refiner: aesthetic score of the negative side", check=finite)
    refiner_switch: float = setting(0.8, "SDXL base + refiner as an ensemble of experts: the fraction of the schedule "
                                    "(by training timestep) the base runs before the refiner takes over "
                                    "(diffusers' denoising_end / denoising_start)", check=between(0, 1),
                                    flags=("high-noise-frac", "high_noise_frac"))
    refiner_strength: Optional[float] = setting(None, "SDXL refiner as img2img after the whole base run, with this "
                                                "strength; null = ensemble of experts at refiner_switch",
                                                check=between(0, 1))
    vae_tiling: bool = setting(False, "decode (and encode init images) in overlapping tiles, blended, no seams: peak "
                               "memory follows the tile, for large images; slightly different pixels")
    vae_tile_size: int = setting(64, "latent pixels per VAE tile (x8 image pixels), overlapping by a quarter",
                                 check=at_least(16))
    vae_slicing: bool = setting(False, "decode a batch one image at a time (same pixels, less memory)")
    precision: str = setting("fp32", "fp32 | bf16 | fp16 (weights in that dtype) | autocast (CompVis: full)",
                             choices=_precisions, value_aliases={"full": "fp32"})
    batch_invariant: bool = setting(False, "compute each image on its own: bit-identical whatever else is in the batch "
                                    "(slower); default: images run batch_size at a time, equal to a lone run up to "
                                    "kernel rounding")
    batch_size: Optional[int] = setting(None, "images per batch through the text encoder, UNet and VAE; null = "
                                        "all of them (n_samples in the scripts, all images of a generate() call "
                                        "in Python), fewer where their VAE decode would not fit in free memory",
                                        check=at_least(1))
    # Approximate accelerations, off by default (ldm.models.diffusion.sampling.approx); not for the x4 upscaler.
    deepcache_interval: Optional[int] = setting(None, "approximate speed-up (DeepCache feature reuse): run the whole "
                                                "UNet only every N-th call and reuse its deep features in between "
                                                "(only the shallow blocks run); null = off (exact)", check=at_least(1),
                                                tasks=APPROX_TASKS)
    deepcache_depth: int = setting(1, "feature reuse: the deepest UNet input block still run on reuse calls (0 = the "
                                   "input convolution; 1 = DeepCache's choice for SD), with the output blocks its skips "
                                   "feed", check=at_least(0), tasks=APPROX_TASKS)
    tome_ratio: Optional[float] = setting(None, "approximate speed-up (token merging, ToMe for SD): fraction of tokens "
                                          "merged before self-attention in the highest-resolution transformer blocks "
                                          "(0.5 is tomesd's default); null = off (exact)", check=between(0, TOME_MAX_RATIO),
                                          tasks=APPROX_TASKS)
    tome_layers: str = setting("self_attention", "token merging: the sub-layers of each merged transformer block that "
                               "run on the merged tokens: self_attention (tomesd's default) | attention (+ cross-"
                               "attention) | all (+ feed-forward: faster, further from exact)",
                               choices=lambda: list(TOME_LAYERS), tasks=APPROX_TASKS)
    tome_max_downsample: int = setting(1, "token merging: also merge in the transformers this many times downsampled "
                                       "(1 = the highest resolution only, as tomesd; 2, 4, 8)",
                                       check=one_of(*TOME_MAX_DOWNSAMPLES), tasks=APPROX_TASKS)


@dataclass
class RunSettings(SamplingSettings):
    """A script run: the model, prompts, seeds, outputs (plus everything of :class:`SamplingSettings`)."""

    prompt: Optional[str] = setting(None, "the prompt (or from_file)")
    from_file: Optional[str] = setting(None, "a text file: one prompt per non-empty line", flags=("from-file",),
                                       recipe=False)
    config: Optional[str] = setting(None, "model YAML; with ckpt unset too, the bundled demo model")
    ckpt: Optional[str] = setting(None, "weights: .safetensors or .ckpt")
    use_ema: bool = setting(False, "use the file's model_ema.* weights")
    n_samples: int = setting(3, "images per prompt in each iteration", check=at_least(1), recipe=False,
                             task_defaults={"upscale": 1})
    n_iter: int = setting(2, "iterations", check=at_least(1), recipe=False, task_defaults={"upscale": 1})
    seed: int = setting(42, "seed of the first image; image k gets seed + k", check=between(0, MAX_SEED))
    fixed_code: bool = setting(False, "every image starts from the same noise (seed)", recipe=False)
    compile: bool = setting(False, "torch.compile the UNet (the first image pays the compilation)")
    channels_last: Optional[bool] = setting(None, "UNet and autoencoder weights and activations channels-last (fewer "
                                            "layout conversions, faster convolutions); null = on for bf16/fp16/"
                                            "autocast, and for the autoencoder alone under fp32 on a CPU")
    vae: Optional[str] = setting(None, "a VAE weights file that replaces the model's autoencoder (CompVis or diffusers "
                                 "keys), e.g. sdxl-vae-fp16-fix: under precision=fp16 it then decodes in fp16")
    lora: Optional[str] = setting(None, "a LoRA file (kohya, diffusers or PEFT layout) merged into the UNet / text "
                                  "encoder before sampling, e.g. an LCM-LoRA with sampler=lcm")
    lora_scale: float = setting(1.0, "strength of lora (1 = as trained, 0 = off)", check=finite)
    embeddings: Optional[str] = setting(None, "textual-inversion embeddings as new prompt tokens: FILE[:token] "
                                        "(AUTOMATIC1111 .pt/.safetensors, diffusers, SDXL clip_l/clip_g; token "
                                        "default: the file's stem), several separated by ';' (--embedding repeats)",
                                        flags=("embedding",), joins=";", recipe_absent=None, recipe_absent_set=True)
    offload: str = setting("none", "none | model (one part on the device at a time: text encoders, UNet, VAE) | "
                           "sequential (one layer at a time; least memory, slowest); for GPUs", recipe=False,
                           choices=lambda: ["none", "model", "sequential"])
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", recipe=False)
    outdir: str = setting("outputs/txt2img-samples", "output folder", recipe=False,
                          task_defaults={"img2img": "outputs/img2img-samples", "inpaint": "outputs/inpainting-samples",
                                         "upscale": "outputs/upscale-samples", "depth2img": "outputs/depth2img-samples"})
    skip_grid: bool = setting(False, "do not write the grid image", recipe=False)
    skip_save: bool = setting(False, "do not write the single images", recipe=False)
    n_rows: int = setting(0, "images per grid row (0 = one row per iteration)", check=at_least(0), recipe=False)
    regenerate: Optional[str] = setting(None, "a PNG written by these scripts: reproduce that one image", recipe=False)
    refiner_ckpt: Optional[str] = setting(None, "SDXL refiner weights that finish each image (see refiner_switch, "
                                          "refiner_strength)", flags=("refiner",))
    refiner_config: Optional[str] = setting(None, "the refiner's model YAML; null = "
                                            "configs/stable-diffusion/sdxl-refiner.yaml", flags=("refiner-config",))
    init_img: Optional[str] = setting(None, "img2img/inpaint/depth2img: the image to start from; upscale: the low-res "
                                      "input", flags=("init-img",), tasks=("img2img", "inpaint", "upscale", "depth2img"))
    depth_map: Optional[str] = setting(None, "depth2img: a depth map image (white = near, any size) used instead of "
                                       "the init image's MiDaS estimate", flags=("depth-map",), tasks=("depth2img",))
    midas_weights: Optional[str] = setting(None, "depth2img: the MiDaS weights (dpt_hybrid-midas-501f0c75.pt) for a "
                                           "checkpoint without depth_model.* keys; null = the checkpoint's own",
                                           flags=("midas-weights",), tasks=("depth2img",))
    mask: Optional[str] = setting(None, "inpaint: white = repaint, black = keep", tasks=("inpaint",))


# The declaration in force; tests swap in a subclass with an extra field to prove everything follows it.
RUN_SETTINGS: type = RunSettings


@dataclass(frozen=True)
class Declared:
    """One setting as seen by a task: name, base type, whether null is allowed, default, spec."""

    name: str
    kind: type
    nullable: bool
    default: Any
    spec: Spec
    sampling: bool  # part of SamplingSettings (passed to generate)


def declared(task: Optional[str] = None) -> list[Declared]:
    """The settings of ``task`` (all tasks' when None), in declaration order."""
    cls = RUN_SETTINGS
    hints = typing.get_type_hints(cls)
    sampling_names = {f.name for f in dataclasses.fields(SamplingSettings)}
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec") or Spec(help="")
        if task is not None and task not in spec.tasks:
            continue
        kind, nullable = hints[f.name], False
        if typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, nullable = args[0], len(args) < len(typing.get_args(kind))
        kind = typing.get_origin(kind) or kind  # list[int] -> list
        default = spec.task_defaults.get(task, f.default) if task else f.default
        out.append(Declared(f.name, kind, nullable, default, spec, f.name in sampling_names))
    return out


def by_name(task: Optional[str] = None) -> dict[str, Declared]:
    return {d.name: d for d in declared(task)}


def defaults(task: str) -> dict[str, Any]:
    return {d.name: d.default for d in declared(task)}


def flag_names(task: Optional[str] = None) -> dict[str, str]:
    """Every accepted flag spelling (without dashes) -> setting name: --name, --name-with-dashes, CompVis aliases."""
    out = {}
    for d in declared(task):
        for flag in (d.name, d.name.replace("_", "-"), *d.spec.flags):
            out[flag] = d.name
    return out


def switches(task: Optional[str] = None) -> dict[str, tuple[str, Any]]:
    """Value-less flags: flag -> (setting, value)."""
    return {flag: (d.name, value) for d in declared(task) for flag, value in d.spec.switches.items()}


def type_problem(d: Declared, value: Any) -> Optional[str]:
    """What is wrong with the *type* of ``value`` for setting ``d`` (JSON/YAML values: no coercion)."""
    if value is None:
        return None if d.nullable else "must be set (it is null)"
    ok = {str: isinstance(value, str), bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          list: isinstance(value, (list, tuple))}.get(d.kind, True)
    if ok:
        return None
    want = {str: "text", bool: "true or false", int: "an integer", float: "a number", list: "a list"}[d.kind]
    return f"must be {want}, got {value!r}"


def value_problem(d: Declared, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for setting ``d`` (type, choices, range), or None."""
    problem = type_problem(d, value)
    if problem or value is None:
        return problem
    if d.spec.choices is not None and value not in d.spec.choices():
        return f"must be one of {', '.join(d.spec.choices())}, got {value!r}"
    return d.spec.check(value) if d.spec.check is not None else None


def problems(values: Mapping[str, Any], task: Optional[str] = None, *, timesteps: Optional[int] = None) -> list[str]:
    """Every problem of a settings mapping, one message each (keys it lacks are not checked)."""
    from ldm.models.diffusion.sampling import SAMPLERS

    found = []
    for d in declared(task):
        if d.name in values and (problem := value_problem(d, values[d.name])):
            found.append(f"{d.name} {problem}")
    if found:
        return found
    steps, sampler = values.get("steps"), values.get("sampler")
    if timesteps is not None and steps is not None and steps > timesteps:
        found.append(f"steps must be at most the model's {timesteps} training timesteps, got {steps}")
    if values.get("eta") not in (None, 0) and sampler in SAMPLERS and "eta" not in SAMPLERS[sampler].options:
        spec = SAMPLERS[sampler]
        takes = ", ".join(n for n in sorted(SAMPLERS) if "eta" in SAMPLERS[n].options)
        found.append(f"sampler {sampler!r} {'' if spec.stochastic else 'is deterministic and '}takes no eta; "
                     f"use one of {takes}")
    return found


def validate(values: Mapping[str, Any], task: Optional[str] = None, *, timesteps: Optional[int] = None) -> None:
    """Raise one ``ValueError`` naming every problem of ``values`` (see :func:`problems`)."""
    found = problems(values, task, timesteps=timesteps)
    if found:
        raise ValueError("; ".join(found))


def recipe_fields(task: str) -> list[str]:
    """Settings each PNG of ``task`` records (besides per-image prompt/seed and model/input hashes)."""
    return [d.name for d in declared(task) if d.spec.recipe]


def check_recipe(meta: Mapping[str, Any], task: str, source: str) -> None:
    """Recorded recipe fields have the declared types and valid values; one line naming the field."""
    for d in declared(task):
        if d.spec.recipe and d.name in meta and (problem := value_problem(d, meta[d.name])):
            raise ValueError(f"{source}: recipe field {d.name!r} {problem}; the PNG's metadata was altered "
                             "or written by another tool")


def sampling_settings(values: Mapping[str, Any]) -> SamplingSettings:
    """The :class:`SamplingSettings` part of a run's settings (absent fields keep their defaults)."""
    names = [f.name for f in dataclasses.fields(SamplingSettings)]
    return SamplingSettings(**{n: values[n] for n in names if n in values})


def register_configs() -> None:
    """Store each task's settings schema in Hydra's ConfigStore as ``<task>_settings`` (typed, with defaults)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for task in TASKS:
        fields_ = []
        for d in declared(task):
            kind = typing.List[int] if d.kind is list else d.kind
            default = field(default_factory=lambda v=d.default: list(v)) if isinstance(d.default, (list, tuple)) \
                else field(default=d.default)
            fields_.append((d.name, Optional[kind] if d.nullable else kind, default))
        store.store(name=f"{task}_settings", node=dataclasses.make_dataclass(f"{task.title()}Settings", fields_))


def help_text(task: str) -> str:
    """``--help`` of a script: every setting with its flags, default and meaning."""
    lines = [f"usage: scripts/{task}.py [--flag value | key=value] ...", "",
             "Every setting below works as --name value, key=value (Hydra), or a CompVis flag where listed.",
             "Without --ckpt/--config the bundled demo model is used.", ""]
    for d in declared(task):
        flags = ", ".join(f"--{f}" for f in (d.spec.flags + tuple(d.spec.switches)))
        kind = d.kind.__name__ + (" | null" if d.nullable else "")
        lines.append(f"  {d.name} ({kind}, default {d.default!r}){'  [' + flags + ']' if flags else ''}")
        lines.append(f"      {d.spec.help}")
    return "\n".join(lines)


def names(task: Optional[str] = None) -> Iterable[str]:
    return [d.name for d in declared(task)]
