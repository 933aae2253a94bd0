#!/usr/bin/env python
"""SDXL against diffusers, like for like, in one run: UNet step speed and single-file load cost.

    python benchmarks/bench_sdxl.py [--parts unet,load] [--config configs/stable-diffusion/sdxl-base.yaml]
                                    [--size 1024] [--repeats 2] [--threads N] [--workdir DIR] [--keep]

Smoke test (tiny model, seconds):

    python benchmarks/bench_sdxl.py --config configs/tiny/tiny-sdxl.yaml --size 64 --threads 1

Parts (random weights throughout; nothing is downloaded):

``unet``  One denoising step with classifier-free guidance: a UNet call on a batch of 2 latents
          (size/8 x size/8), a [2, 77, context_dim] cross-attention context and the [2, adm_in_channels]
          vector (pooled text embedding + sinusoidal micro-conditioning of 6 size/crop ids). Ours is
          ``UNetModel``; diffusers' is ``UNet2DConditionModel`` holding exactly the same weights (converted by
          diffusers' single-file utilities, SDXL "text_time" addition embedding). Diffusers gets the pooled
          embedding as ``text_embeds`` and the raw ids as ``time_ids``; ours gets the vector our conditioner
          builds from them, so both feed the same numbers to the same Linear. Measured in fp32 and in bf16
          (weights and inputs in bf16), each as a warm-up call (its output compared: max |ours - diffusers|)
          then ``--repeats`` timed calls under ``torch.inference_mode()``; the median is reported. Only one copy
          of the weights is ever alive: once ours is timed, diffusers' UNet is assembled from its very tensors
          (shared, not copied) and our module is dropped, so the full-size fp32 run needs ~10 GiB, not 20.
``load``  A random SDXL single file (every key of our model: UNet, both text encoders, VAE) is written in
          fp16 safetensors one tensor at a time (full size: a 6.5 GiB file written holding < 0.5 GB), then
          loaded ``--repeats`` times each in fresh processes, each timed up to having touched every weight:
            ours       ldm.api.load_model(config, file, dtype=torch.float16)
            diffusers  StableDiffusionXLPipeline.from_single_file(file, config=<local diffusers folder>,
                       local_files_only=True, torch_dtype=torch.float16)
          The local folder (model_index.json, per-component configs, tokenizer files, scheduler config) is
          written next to the file from the same config, which is what diffusers needs to work offline. Should
          the pipeline load fail (or be bound to fail: configs whose two text encoders have the same width, like
          configs/tiny/tiny-sdxl.yaml, which diffusers cannot tell apart), diffusers' per-model loaders (UNet,
          VAE, both text encoders; no tokenizers / scheduler) are measured instead, labelled so. Peak RSS is the
          child's VmHWM; "imports" is its VmHWM before loading started (imports are not timed).

Prints readable tables, then one JSON line with every number.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs/stable-diffusion/sdxl-base.yaml"
CHECKPOINT_NAME = "sdxl-random-fp16.safetensors"
DIFFUSERS_FOLDER = "diffusers-config"
PROMPT_TOKENS = 77
TIMESTEP = 500  # one mid-schedule step; the UNet's cost does not depend on it
GiB = 2**30


# ----------------------------------------------------------------------------------------------- shared helpers

def vm_hwm() -> int:
    """Peak resident set of this process in bytes (VmHWM resets at exec, unlike ru_maxrss of a forked child)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_node(config: str) -> Any:
    """The config's ``model`` node (sgm YAMLs accepted: ldm.api resolves their targets)."""
    from ldm.api import load_config

    return load_config(config)


def original_config(config: str) -> dict:
    """The model config as diffusers' single-file utilities expect the "original config" (a plain dict)."""
    return {"model": {"params": OmegaConf.to_container(model_node(config).params, resolve=True)}}


def micro_conditioning(params: dict) -> tuple[int, int]:
    """(number of micro-conditioning ids, sinusoid width per id) of an SDXL conditioner: (6, 256) for the base."""
    outdims = [e["params"]["outdim"] for e in params["conditioner_config"]["params"]["emb_models"]
               if str(e["target"]).endswith("ConcatTimestepEmbedderND")]
    if not outdims or len(set(outdims)) != 1:
        raise SystemExit("config has no (or mixed-width) ConcatTimestepEmbedderND embedders; is it an SDXL config?")
    return 2 * len(outdims), outdims[0]  # each embedder embeds a pair (height, width) / (top, left)


def norm_weight_names(module: nn.Module) -> set[str]:
    """Names of the scale parameters of normalisation layers (drawn around 1, not 0)."""
    return {f"{name}.weight" if name else "weight" for name, mod in module.named_modules()
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and getattr(mod, "weight", None) is not None}


def random_weight(name: str, shape: tuple[int, ...], norm_weight: bool, seed: int) -> torch.Tensor:
    """A reproducible fp32 value for parameter ``name``: N(0, 1/fan_in) for matrices / kernels, 0 (1 for norm
    scales) + N(0, 0.01) for vectors. Drawn per name, so any subset of a model can be re-made alone, and at a
    normal scale: CompVis zero-initialises output layers, which would make every output (and difference) 0."""
    if len(shape) == 0:
        return torch.ones(())
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if len(shape) == 1:
        return (1.0 if norm_weight else 0.0) + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g).div_(math.sqrt(math.prod(shape[1:])))


def materialize_random_(module: nn.Module, dtype: torch.dtype, seed: int) -> nn.Module:
    """Give every (meta) parameter of ``module`` its ``random_weight`` in ``dtype``, one tensor at a time."""
    norms = norm_weight_names(module)
    for mod_name, mod in module.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            value = random_weight(full, tuple(p.shape), full in norms, seed).to(dtype)
            mod._parameters[pname] = nn.Parameter(value, requires_grad=False)
    return module.to(dtype).eval()  # float buffers (if any) follow


def timed_calls(fn: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """Warm-up call (its output returned, not timed), then ``repeats`` timed calls."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return out, times


# ------------------------------------------------------------------------------------------------------ unet

def build_our_unet(config: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """Our SDXL ``UNetModel`` alone (no text encoders / VAE), built on meta then filled with random weights."""
    from ldm.checkpoint import empty_init
    from ldm.util import instantiate_from_config

    with empty_init():
        unet = instantiate_from_config(model_node(config).params.network_config)
    return materialize_random_(unet, dtype, seed)


def diffusers_unet_sharing(ours: nn.Module, original: dict, time_dim: int) -> nn.Module:
    """diffusers' UNet2DConditionModel whose parameters are ``ours``' tensors (no copy), as diffusers' single-file
    loader maps them; SDXL's "text_time" addition embedding is forced (tiny configs would get "projection")."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sf

    from ldm.checkpoint import empty_init

    ckpt = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    cfg = sf.create_unet_diffusers_config_from_ldm(original, ckpt)
    cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=time_dim)
    with empty_init():
        unet = UNet2DConditionModel(**cfg)
    unet.load_state_dict(sf.convert_ldm_unet_checkpoint(ckpt, cfg), strict=True, assign=True)
    meta = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if meta:
        raise SystemExit(f"diffusers UNet still has meta tensors after conversion: {meta[:5]}")
    return unet.eval()


def unet_inputs(params: dict, size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One CFG step's inputs (rows: unconditional, conditional), in the compute dtype.

    ``y`` is what our conditioner builds: [pooled text embedding, sinusoids of the 6 ids]; diffusers builds the
    same from (``text_embeds``, ``time_ids``) and casts it to the weights' dtype just as ours does, so the two
    Linear layers see identical numbers (only the sinusoid implementations differ)."""
    from ldm.modules.encoders.sdxl import ConcatTimestepEmbedderND

    net = params["network_config"]["params"]
    n_ids, time_dim = micro_conditioning(params)
    pooled_dim = net["adm_in_channels"] - n_ids * time_dim
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, net["in_channels"], size // 8, size // 8, generator=g)
    context = torch.randn(2, PROMPT_TOKENS, net["context_dim"], generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g).to(dtype)
    # (original h, w, crop top, left, target h, w); the unconditional row's ids are the same in SDXL sampling.
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)[:, :n_ids]
    y = torch.cat([pooled.float(), ConcatTimestepEmbedderND(time_dim)(time_ids)], dim=1).to(dtype)
    return {"x": x.to(dtype), "t": torch.full((2,), TIMESTEP, dtype=torch.long), "context": context.to(dtype),
            "y": y, "text_embeds": pooled, "time_ids": time_ids}


def bench_unet(config: str, size: int, repeats: int, seed: int) -> dict:
    original = original_config(config)
    params = original["model"]["params"]
    _, time_dim = micro_conditioning(params)
    results: dict[str, Any] = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        inp = unet_inputs(params, size, dtype)
        ours = build_our_unet(config, dtype, seed)
        n_params = sum(p.numel() for p in ours.parameters())
        with torch.inference_mode():
            ours_out, ours_times = timed_calls(
                partial(ours, inp["x"], inp["t"], context=inp["context"], y=inp["y"]), repeats)
        theirs = diffusers_unet_sharing(ours, original, time_dim)
        del ours  # diffusers' module now holds the only references to the weights
        gc.collect()
        added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
        with torch.inference_mode():
            (theirs_out,), theirs_times = timed_calls(
                partial(theirs, inp["x"], inp["t"], encoder_hidden_states=inp["context"], added_cond_kwargs=added,
                        return_dict=False), repeats)
        del theirs
        gc.collect()
        a, b = ours_out.float(), theirs_out.float()
        results[label] = {
            "ours_s": statistics.median(ours_times), "diffusers_s": statistics.median(theirs_times),
            "ours_times": ours_times, "diffusers_times": theirs_times,
            "max_abs_diff": float((a - b).abs().max()), "rel_err": float((a - b).norm() / b.norm()),
            "out_std": float(b.std()), "params": n_params,
        }
        results[label]["diffusers_over_ours"] = results[label]["diffusers_s"] / results[label]["ours_s"]
    net = params["network_config"]["params"]
    results["shapes"] = {"x": [2, net["in_channels"], size // 8, size // 8],
                         "context": [2, PROMPT_TOKENS, net["context_dim"]], "y": [2, net["adm_in_channels"]]}
    return results


def print_unet(res: dict, repeats: int) -> None:
    s = res["shapes"]
    print(f"\nUNet step, CFG batch (x {s['x']}, context {s['context']}, y {s['y']}), "
          f"{res['fp32']['params'] / 1e9:.3f}B params, median of {repeats} after 1 warm-up, "
          f"{torch.get_num_threads()} threads")
    print(f"{'precision':9s} {'ours s/step':>12s} {'diffusers s/step':>17s} {'diffusers/ours':>15s} "
          f"{'max abs diff':>15s} {'rel err':>9s} {'out std':>8s}")
    for label in ("fp32", "bf16"):
        r = res[label]
        print(f"{label:9s} {r['ours_s']:12.3f} {r['diffusers_s']:17.3f} {r['diffusers_over_ours']:14.2f}x "
              f"{r['max_abs_diff']:15.3g} {r['rel_err']:9.2g} {r['out_std']:8.3f}")


# ------------------------------------------------------------------------------------------------------ load

_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_random_checkpoint(config: str, path: Path, seed: int) -> tuple[int, int]:
    """Stream every key of our model (built on meta) into a fp16 safetensors file, one tensor at a time, so the
    full-size 7 GB file costs ~one tensor of memory. Parameters get ``random_weight``; buffers that are saved
    (e.g. the denoiser's sigmas) their real values. Returns (file bytes, tensor count)."""
    from ldm.api import build_model

    model = build_model(config, empty=True)
    norms = norm_weight_names(model)
    state = model.state_dict(keep_vars=True)
    names = sorted(state)

    def value(name: str) -> torch.Tensor:
        t = state[name]
        v = random_weight(name, tuple(t.shape), name in norms, seed) if t.is_meta else t.detach()
        return (v.half() if v.is_floating_point() else v).contiguous()

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float16 if t.is_floating_point() else t.dtype

    header: dict[str, Any] = {"__metadata__": {"format": "pt", "note": "random weights (bench_sdxl.py)"}}
    offset = 0
    for name in names:
        t = state[name]
        nbytes = t.numel() * out_dtype(t).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[out_dtype(t)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(value(name).reshape(-1).view(torch.uint8).numpy().data)  # no extra copy
    tmp.replace(path)
    return path.stat().st_size, len(names)


def write_diffusers_folder(config: str, folder: Path) -> tuple[int, int]:
    """The diffusers-format folder (no weights) that ``StableDiffusionXLPipeline.from_single_file(file,
    config=folder, local_files_only=True)`` reads offline: model_index.json naming the component classes, and per
    component a config (unet/vae: converted from our config by diffusers' own single-file utilities; text
    encoders: CLIPTextConfig of the same shapes as ours), tokenizer files and a scheduler config.
    Returns the hidden widths of the two text encoders (CLIP ViT-L, OpenCLIP bigG)."""
    import diffusers
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextConfig, CLIPTokenizer

    from benchmarks.peers import hf_clip_tokenizer
    from ldm.api import build_model

    model = build_model(config, empty=True)  # shapes only (meta): builds in seconds, costs nothing
    original = original_config(config)
    sd = model.state_dict(keep_vars=True)
    _, time_dim = micro_conditioning(original["model"]["params"])
    folder.mkdir(parents=True, exist_ok=True)

    def dump(sub: str, cls: str, cfg: dict) -> None:  # a diffusers model's config.json
        (folder / sub).mkdir(exist_ok=True)
        body = {"_class_name": cls, "_diffusers_version": diffusers.__version__, **cfg}
        (folder / sub / "config.json").write_text(json.dumps(body, indent=2))

    ucfg = sf.create_unet_diffusers_config_from_ldm(original, sd)
    ucfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=time_dim)
    dump("unet", "UNet2DConditionModel", ucfg)
    dump("vae", "AutoencoderKL", sf.create_vae_diffusers_config_from_ldm(original, sd, scaling_factor=model.scale_factor))

    encoders = model.conditioner.text_encoders()
    if len(encoders) != 2:
        raise SystemExit("the load part needs an SDXL base config (CLIP ViT-L + OpenCLIP bigG text encoders)")
    clip_l = CLIPTextConfig(**encoders[0].transformer.text_model.config.to_dict())
    clip_l.architectures = ["CLIPTextModel"]
    clip_l.save_pretrained(folder / "text_encoder")
    oc = encoders[1].model  # OpenCLIP text tower; its shapes give the diffusers (HF CLIP) config
    block = oc.transformer.resblocks[0]
    clip_g = CLIPTextConfig(
        vocab_size=oc.token_embedding.num_embeddings, hidden_size=oc.positional_embedding.shape[1],
        projection_dim=oc.text_projection.shape[1], intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(oc.transformer.resblocks), num_attention_heads=block.attn.num_heads,
        max_position_embeddings=oc.positional_embedding.shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    clip_g.architectures = ["CLIPTextModelWithProjection"]
    clip_g.save_pretrained(folder / "text_encoder_2")

    # Tokenizers: OpenAI's CLIP BPE (written from open_clip's table); SDXL's second one pads with "!".
    hf_clip_tokenizer(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), pad_token="!",
                                  model_max_length=PROMPT_TOKENS).save_pretrained(folder / "tokenizer_2")
    diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon").save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True,
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return clip_l.hidden_size, clip_g.hidden_size


def _config_targets(node: Any) -> Iterator[str]:
    """Every ``target:`` class path in a config, to import before a load is timed."""
    if isinstance(node, dict):
        if isinstance(node.get("target"), str):
            yield node["target"]
        for v in node.values():
            yield from _config_targets(v)
    elif isinstance(node, list):
        for v in node:
            yield from _config_targets(v)


def _diffusers_open_clip(checkpoint: dict, folder: str) -> nn.Module:
    """text_encoder_2 the way diffusers' ``create_diffusers_clip_model_from_ldm`` builds it (empty model, its
    OpenCLIP converter, ``load_model_dict_into_meta``), minus its choice of converter by hidden width, which
    mistakes bigG for CLIP ViT-L when both have the same width (tiny configs)."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as sf
    from diffusers.models.model_loading_utils import load_model_dict_into_meta
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)
    state = sf.convert_open_clip_checkpoint(model, checkpoint, prefix="conditioner.embedders.1.model.")
    if not hasattr(model, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    load_model_dict_into_meta(model, state, dtype=torch.float16)
    return model.to(torch.float16).eval()


def load_child(mode: str, config: str, file: str, folder: str) -> None:
    """Runs in a fresh process: load ``file`` the ``mode`` way, touch every weight, print one JSON line."""
    # Import cost is not load cost: import what each loader will use before the clock starts.
    if mode == "ours":
        from ldm.api import load_model
        from ldm.util import get_obj_from_str

        for target in set(_config_targets(original_config(config))):
            get_obj_from_str(target)
    else:
        import diffusers
        from diffusers.loaders import single_file_utils as sf
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401 (warm import)

        importlib.import_module("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl")
    base = vm_hwm()
    start = time.perf_counter()
    if mode == "ours":
        modules = [load_model(config, file, dtype=torch.float16)]
    elif mode == "diffusers":
        pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
            file, config=folder, local_files_only=True, torch_dtype=torch.float16, add_watermarker=False)
        modules = [c for c in pipe.components.values() if isinstance(c, nn.Module)]
    else:  # "diffusers-components": the loaders from_single_file runs, one per model component
        kw: dict[str, Any] = {"config": folder, "local_files_only": True, "torch_dtype": torch.float16}
        modules = [diffusers.UNet2DConditionModel.from_single_file(file, subfolder="unet", **kw),
                   diffusers.AutoencoderKL.from_single_file(file, subfolder="vae", **kw)]
        checkpoint = sf.load_single_file_checkpoint(file, local_files_only=True)
        modules.append(sf.create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                               **kw))
        modules.append(_diffusers_open_clip(checkpoint, folder))
        del checkpoint
    # Touch every weight so lazily mapped pages count (a first forward pass would); float64 sum as a checksum.
    # Scalars are left out of it: OpenCLIP's logit_scale is in our model, not in diffusers' text encoder.
    params = [p for p in {id(p): p for m in modules for p in m.parameters()}.values() if p.dim()]
    checksum = sum(float(p.detach().double().sum()) for p in params)
    seconds = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    print(json.dumps({"seconds": seconds, "peak_rss": vm_hwm(), "base_rss": base, "checksum": checksum,
                      "params": sum(p.numel() for p in params), "dtypes": dtypes}))


def run_child(mode: str, config: str, file: Path, folder: Path, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--config", config, "--child-file", str(file),
           "--child-folder", str(folder)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-3000:] or f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(config: str, work: Path, repeats: int, seed: int, threads: int | None) -> dict:
    file, folder = work / CHECKPOINT_NAME, work / DIFFUSERS_FOLDER
    start = time.perf_counter()
    file_bytes, n_tensors = write_random_checkpoint(config, file, seed)
    print(f"wrote {file_bytes / GiB:.2f} GiB random fp16 SDXL weights ({n_tensors} tensors) in "
          f"{time.perf_counter() - start:.0f}s: {file}")
    widths = write_diffusers_folder(config, folder)
    runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    diffusers_mode = "diffusers"
    pipeline_error: str | None = None  # why the pipeline loader is not the one measured, if it is not
    if widths[0] == widths[1]:
        # diffusers picks the converter of a CLIP component by comparing the file's position embedding width
        # with the model's: with equal widths, text_encoder_2 would get CLIP ViT-L's weights and fail to load.
        pipeline_error = (f"not attempted: both text encoders have width {widths[0]}, which diffusers' "
                               "single-file loader cannot tell apart (real SDXL: 768 vs 1280)")
        print(f"StableDiffusionXLPipeline.from_single_file {pipeline_error}; measuring diffusers' "
              "per-model loaders instead")
        diffusers_mode = "diffusers-components"
    for _ in range(repeats):
        for mode in ("ours", diffusers_mode):
            r = run_child(mode, config, file, folder, threads)
            if "error" in r and mode == "diffusers":
                # Offline pipeline load failed: say why, then measure the per-model loaders instead.
                pipeline_error = r["error"]
                print(f"StableDiffusionXLPipeline.from_single_file failed offline; measuring diffusers' "
                      f"per-model from_single_file loaders instead. Error tail:\n{r['error'][-1500:]}")
                diffusers_mode = "diffusers-components"
                r = run_child(diffusers_mode, config, file, folder, threads)
            if "error" in r:
                raise SystemExit(f"{mode} load failed:\n{r['error']}")
            runs["ours" if mode == "ours" else "diffusers"].append(r)

    def summary(rs: list[dict]) -> dict:
        return {"seconds": statistics.median(r["seconds"] for r in rs),
                "peak_rss": int(statistics.median(r["peak_rss"] for r in rs)),
                "base_rss": int(statistics.median(r["base_rss"] for r in rs)),
                "checksum": rs[0]["checksum"], "params": rs[0]["params"], "dtypes": rs[0]["dtypes"],
                "all_seconds": [r["seconds"] for r in rs], "all_peak_rss": [r["peak_rss"] for r in rs]}

    res = {"file_bytes": file_bytes, "tensors": n_tensors, "diffusers_loader": diffusers_mode,
           "pipeline_error": pipeline_error,
           "ours": summary(runs["ours"]), "diffusers": summary(runs["diffusers"])}
    o, d = res["ours"], res["diffusers"]
    res["diffusers_over_ours"] = {"seconds": d["seconds"] / o["seconds"], "peak_rss": d["peak_rss"] / o["peak_rss"]}
    # Both loaders must end with the same weights (sums over the same values, in another order).
    res["same_weights"] = (o["params"] == d["params"]
                           and abs(o["checksum"] - d["checksum"]) <= 1e-6 * abs(o["checksum"]) + 1e-3)
    return res


def print_load(res: dict, repeats: int) -> None:
    fb = res["file_bytes"]
    label = {"diffusers": "diffusers (SDXLPipeline.from_single_file)",
             "diffusers-components": "diffusers (per-model from_single_file)"}[res["diffusers_loader"]]
    print(f"\nSingle-file load, fp16 file {fb / GiB:.2f} GiB, median of {repeats} fresh processes each "
          f"(time and peak up to every weight touched)")
    print(f"{'loader':43s} {'seconds':>8s} {'peak RSS GiB':>13s} {'peak/file':>10s} {'(peak-imports)/file':>20s} "
          f"{'params':>8s}")
    for key, name in (("ours", "ours (ldm.api.load_model)"), ("diffusers", label)):
        r = res[key]
        print(f"{name:43s} {r['seconds']:8.2f} {r['peak_rss'] / GiB:13.2f} {r['peak_rss'] / fb:9.2f}x "
              f"{(r['peak_rss'] - r['base_rss']) / fb:19.2f}x {r['params'] / 1e9:7.3f}B")
    ratio = res["diffusers_over_ours"]
    print(f"ratio diffusers/ours: time {ratio['seconds']:.2f}x, peak RSS {ratio['peak_rss']:.2f}x; "
          f"same weights loaded: {'yes' if res['same_weights'] else 'NO (checksums differ)'}")


# ------------------------------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="unet,load", help="comma-separated subset of: unet, load")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="SDXL base model YAML")
    parser.add_argument("--size", type=int, default=1024, help="image size in pixels (latents are size/8)")
    parser.add_argument("--repeats", type=int, default=2, help="timed UNet calls / load processes per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--workdir", default=None, help="where the load part writes its files (default: a tempdir)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint and diffusers folder")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return load_child(args.child, args.config, args.child_file, args.child_folder)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - {"unet", "load"}:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from unet, load")
    if args.size % 8 or args.repeats < 1:
        parser.error("--size must be a multiple of 8 and --repeats at least 1")
    import diffusers

    result: dict[str, Any] = {"config": args.config, "size": args.size, "repeats": args.repeats,
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "diffusers": diffusers.__version__}
    print(f"SDXL vs diffusers {diffusers.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"config {args.config}")
    if "unet" in parts:
        result["unet"] = bench_unet(args.config, args.size, args.repeats, args.seed)
        print_unet(result["unet"], args.repeats)
    if "load" in parts:
        temporary = args.workdir is None
        work = Path(args.workdir or tempfile.mkdtemp(prefix="ldm-bench-sdxl-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            result["load"] = bench_load(args.config, work, args.repeats, args.seed, args.threads)
        finally:
            if args.keep:
                print(f"kept {work / CHECKPOINT_NAME} and {work / DIFFUSERS_FOLDER}")
            elif temporary:
                shutil.rmtree(work, ignore_errors=True)
            else:
                (work / CHECKPOINT_NAME).unlink(missing_ok=True)
                shutil.rmtree(work / DIFFUSERS_FOLDER, ignore_errors=True)
        print_load(result["load"], args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
