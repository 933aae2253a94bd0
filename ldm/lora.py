"""LoRA fine-tuning of any ``LatentDiffusion`` through ``peft``: inject, train, save, load, merge.

Files use the kohya / A1111 layout with diffusers module names, which A1111, ComfyUI and
diffusers (``pipe.load_lora_weights``) all read::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  [r, in(, kh, kw)]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    [out, r(, 1, 1)]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                  (text encoder)

with ``W' = W + scale * alpha / r * up @ down``. :func:`load_lora` also reads diffusers' and PEFT's layouts
(``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight``, ``...lora.down.weight``, ``text_encoder.``), as
``pipe.load_lora_weights`` does: e.g. the LCM-LoRAs (attention, projections, resnet convs, samplers, time embedding).

While adapters are injected, ``model.state_dict()`` keeps every original key unchanged (hooks hide
peft's ``base_layer.`` level) and adds ``<module>.lora_A.<adapter>.weight`` / ``lora_B`` entries;
``load_state_dict`` accepts that same layout (e.g. to resume a Lightning run after ``add_lora``).
After :func:`merge_lora` or :func:`remove_lora` the state dict is exactly the original one.
"""
from __future__ import annotations

import copy
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import takewhile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoint import CheckpointError, checkpoint_metadata, read_state_dict
from ldm.files import atomic_output
from ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_LAYER_TYPES = (nn.Linear, nn.Conv2d)
_KINDS = {"lora_down.weight", "lora_up.weight", "alpha"}
# CompVis ResBlock children -> diffusers ResnetBlock2D names.
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_SAMPLER = {"op": "conv"}


# ---------------------------------------------------------------------------- module naming
def _unet(model: nn.Module) -> nn.Module:
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(unet, "input_blocks"):
        raise ValueError("LoRA: expected a LatentDiffusion with a CompVis UNet at model.model.diffusion_model")
    return unet


def _text_model(model: nn.Module) -> nn.Module | None:
    """The HF CLIP text tower of the conditioner's text encoder (SD 1.x FrozenCLIPEmbedder), or None."""
    conditioner = getattr(model, "conditioner", None)
    for encoder in conditioner.text_encoders() if conditioner is not None else []:
        te = getattr(getattr(encoder, "transformer", None), "text_model", None)
        if te is not None and hasattr(te, "encoder") and hasattr(te.encoder, "layers"):
            return te
    return None


def _unet_layout(unet: nn.Module) -> dict[str, tuple[str, Mapping[str, str]]]:
    """CompVis block path -> (diffusers path, renames of the rest), from the UNet's own level structure."""
    nrb, levels = list(unet.num_res_blocks), len(unet.channel_mult)
    table: dict[str, tuple[str, Mapping[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
        "input_blocks.0.0": ("conv_in", {}), "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {}),
        "middle_block.0": ("mid_block.resnets.0", _RESNET), "middle_block.1": ("mid_block.attentions.0", {}),
        "middle_block.2": ("mid_block.resnets.1", _RESNET)}
    k = 1
    for level in range(levels):
        for j in range(nrb[level]):
            table[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.resnets.{j}", _RESNET)
            table[f"input_blocks.{k}.1"] = (f"down_blocks.{level}.attentions.{j}", {})
            k += 1
        if level != levels - 1:
            table[f"input_blocks.{k}.0"] = (f"down_blocks.{level}.downsamplers.0", _SAMPLER)
            k += 1
    k = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb[level] + 1):
            for i, child in enumerate(unet.output_blocks[k]):
                # Index 1 is the transformer, or the upsampler where this level has no attention.
                if i == 0:
                    table[f"output_blocks.{k}.0"] = (f"up_blocks.{up}.resnets.{j}", _RESNET)
                elif isinstance(child, (Upsample, ResBlock)):
                    table[f"output_blocks.{k}.{i}"] = (f"up_blocks.{up}.upsamplers.0", _SAMPLER)
                else:
                    table[f"output_blocks.{k}.{i}"] = (f"up_blocks.{up}.attentions.{j}", {})
            k += 1
    return table


def _diffusers_name(table: Mapping[str, tuple[str, Mapping[str, str]]], name: str) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            new, renames = table[head]
            rest = ".".join(parts[n:])
            rest = renames.get(rest, rest)
            return f"{new}.{rest}" if rest else new
    return None


def _index(model: nn.Module, compvis_aliases: bool = False) -> dict[str, tuple[nn.Module, str]]:
    """kohya module key -> (component root, module path in it) for every LoRA-able layer of ``model``.

    SD 1.x/2.x keys name diffusers' UNet modules (``lora_unet_down_blocks_0_...``) and ``lora_te_``;
    SDXL keys follow kohya's SDXL layout: CompVis UNet names (``lora_unet_input_blocks_4_1_...``) and
    ``lora_te1_`` for the CLIP ViT-L text encoder. ``compvis_aliases`` (reading) accepts both spellings.
    """
    unet = _unet(model)
    table = _unet_layout(unet)
    sdxl = _is_sdxl(model)
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, _LAYER_TYPES) or _is_lora(mod):
            new = _diffusers_name(table, name)
            keys = ["lora_unet_" + name.replace(".", "_")] if sdxl else []
            keys += ["lora_unet_" + new.replace(".", "_")] if new is not None else []
            keys += ["lora_unet_" + name.replace(".", "_")] if compvis_aliases and not sdxl else []
            for key in keys[: None if compvis_aliases else 1]:
                out.setdefault(key, (unet, name))
    te = _text_model(model)
    if te is not None:
        prefixes = ["lora_te1_", "lora_te_"] if sdxl else ["lora_te_", "lora_te1_"]
        for name, mod in te.named_modules():
            if isinstance(mod, _LAYER_TYPES) or _is_lora(mod):
                for prefix in prefixes[: None if compvis_aliases else 1]:
                    out.setdefault(prefix + "text_model_" + name.replace(".", "_"), (te, name))
                    if compvis_aliases:  # diffusers' kohya conversion under transformers 5 drops CLIP's text_model level
                        out.setdefault(prefix + name.replace(".", "_"), (te, name))
    return out


def _is_sdxl(model: nn.Module) -> bool:
    conditioner = getattr(model, "conditioner", None)
    return conditioner is not None and len(conditioner.text_encoders()) > 1


def _is_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in module.named_modules() if _is_lora(m))


def _hide_base_layer(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: ``x.base_layer.weight`` -> ``x.weight`` so base keys stay as in the checkpoint."""
    base = prefix + "base_layer."
    # This layer's entries were just appended: re-insert them (renamed) at the end to keep key order.
    for key in reversed(list(takewhile(lambda k: k.startswith(prefix), reversed(state_dict)))):
        state_dict[prefix + key[len(base):] if key.startswith(base) else key] = state_dict.pop(key)


def _expose_base_layer(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: the inverse of :func:`_hide_base_layer`."""
    for leaf in ("weight", "bias"):
        if prefix + leaf in state_dict:
            state_dict[prefix + "base_layer." + leaf] = state_dict.pop(prefix + leaf)


def _inject(model: nn.Module, specs: Sequence[tuple[nn.Module, Mapping[str, tuple[int, float]]]],
            dropout: float, adapter_name: str) -> list[nn.Parameter]:
    """Wrap ``{path: (rank, alpha)}`` layers of each root with peft LoRA; freeze all else; fp32 adapters."""
    from peft import LoraConfig, inject_adapter_in_model

    # Remember trainability so merge/remove restore the model as it was.
    model._lora_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    for root, spec in specs:
        if not spec:
            continue
        (r0, a0), _ = Counter(spec.values()).most_common(1)[0]
        config = LoraConfig(
            r=r0, lora_alpha=a0, lora_dropout=dropout, target_modules=sorted(spec), init_lora_weights=True,
            # Exact paths as patterns, so files with per-module ranks (kohya "dynamic") load too.
            rank_pattern={re.escape(n): r for n, (r, _) in spec.items() if r != r0},
            alpha_pattern={re.escape(n): a for n, (_, a) in spec.items() if a != a0})
        inject_adapter_in_model(config, root, adapter_name=adapter_name)
        del root.peft_config  # peft's bookkeeping; the layers carry rank/alpha themselves
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for _, layer in _lora_layers(model):
        layer.register_state_dict_post_hook(_hide_base_layer)
        layer.register_load_state_dict_pre_hook(_expose_base_layer)
        for sub in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            sub.float()  # fp32 masters: AMP cannot unscale fp16 grads, and bf16 updates underflow
            for p in sub.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    for name, layer in list(_lora_layers(model)):
        if merge:
            layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    for p, flag in getattr(model, "_lora_requires_grad", []):
        p.requires_grad_(flag)
    if hasattr(model, "_lora_requires_grad"):
        del model._lora_requires_grad
    return model


# ---------------------------------------------------------------------------- diffusers / PEFT layouts
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "base_model.model.")
_DIFFUSERS_KINDS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                    "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
                    "alpha": "alpha"}
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$")  # diffusers' first LoRA format


def _split_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """(component prefix, module path, kohya kind) of a diffusers/PEFT-layout key, or None if it is none."""
    prefix = next((p for p in _DIFFUSERS_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    rest = _OLD_PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.{m[2]}.weight", key[len(prefix):])
    for suffix, kind in _DIFFUSERS_KINDS.items():
        if rest.endswith("." + suffix):
            return prefix, rest[: -len(suffix) - 1], kind
    return None


def _kohya_module(prefix: str, module: str) -> str:
    """kohya's name of a diffusers/PEFT module path. Text-encoder paths come with or without CLIP's ``text_model.``
    level (transformers 4 has it, 5 does not); a PEFT-wrapped model (``base_model.model.``) may be either part."""
    text = prefix == "text_encoder." or module.startswith(("text_model.", "encoder.layers.", "embeddings."))
    if not text:
        return "lora_unet_" + module.replace(".", "_")
    return "lora_te_" + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")


def _adapter_alpha(config: Mapping[str, object], module: str, rank: int) -> float:
    """A module's alpha under a PEFT ``LoraConfig`` as diffusers saves it (``lora_alpha``, ``alpha_pattern`` matched
    as PEFT does, ``use_rslora``); without one, alpha = rank (diffusers' default: scale 1)."""
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in dict(config.get("alpha_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        except re.error:
            raise ValueError(f"load_lora: alpha_pattern {pattern!r} in the file's metadata is not a valid pattern") from None
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha  # rsLoRA scales by alpha / sqrt(r)


def _from_diffusers_layout(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                           source: str) -> dict[str, torch.Tensor]:
    """``state`` with its diffusers/PEFT-layout keys (``unet.<module>.lora_A.weight`` ...) in kohya's spelling, each
    module given the alpha diffusers would use (the file's ``lora_adapter_metadata``, else its rank)."""
    import json

    try:
        adapter = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except ValueError:
        adapter = None
    if not isinstance(adapter, dict):
        raise ValueError(f"load_lora: {source!r} has unreadable lora_adapter_metadata (not a JSON object)")
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, tuple[str, str]] = {}
    for key, tensor in state.items():
        split = _split_diffusers_key(key)
        if split is None:
            if key.startswith(_DIFFUSERS_PREFIXES):
                raise ValueError(f"load_lora: {key} in {source!r} is not a plain LoRA tensor (DoRA, LoRA biases and "
                                 "other adapter kinds are not supported)")
            out[key] = tensor
            continue
        prefix, module, kind = split
        kohya = _kohya_module(prefix, module)
        out[f"{kohya}.{kind}"] = tensor
        modules[kohya] = (prefix, module)
    for kohya, (prefix, module) in modules.items():
        down = out.get(f"{kohya}.lora_down.weight")
        if f"{kohya}.alpha" not in out and down is not None:
            config = _component_config(adapter, prefix, source)
            out[f"{kohya}.alpha"] = torch.tensor(_adapter_alpha(config, module, down.shape[0]))
    return out


def _component_config(adapter: Mapping[str, object], prefix: str, source: str) -> dict[str, object]:
    """The ``LoraConfig`` fields diffusers saved for one component (keys ``unet.lora_alpha`` ...)."""
    config = {k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}
    if config.get("use_dora"):
        raise ValueError(f"load_lora: {source!r} is a DoRA adapter (use_dora); only plain LoRA is supported")
    return config


# ---------------------------------------------------------------------------- public API
def add_lora(
    model: nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    unet_targets: Sequence[str] = UNET_TARGETS,
    text_encoder: bool = False,
    text_targets: Sequence[str] = TEXT_TARGETS,
    adapter_name: str = "default",
) -> list[nn.Parameter]:
    """Inject fresh LoRA adapters (B = 0, so outputs are unchanged) and freeze everything else.

    Targets match module paths by suffix (``"to_q"``, ``"attn2.to_k"``, ``"proj_in"``...) among the
    Linear/Conv2d layers of the UNet (and of the CLIP text encoder if ``text_encoder``).
    Returns the LoRA parameters (fp32, the only ones with ``requires_grad``).
    """
    if any(True for _ in _lora_layers(model)):
        raise ValueError("model already has LoRA adapters; call merge_lora() or remove_lora() first")
    alpha = float(rank if alpha is None else alpha)
    names = {v: k for k, v in _index(model).items()}  # (root, path) -> kohya key
    specs = []
    parts = [(_unet(model), unet_targets, "UNet")]
    if text_encoder:
        te = _text_model(model)
        if te is None:
            raise ValueError("LoRA: text_encoder=True needs a CLIP text encoder (transformers' CLIPTextModel) in the "
                             "model's conditioner")
        parts.append((te, text_targets, "text encoder"))
    for root, targets, what in parts:
        spec = {n: (rank, alpha) for n, m in root.named_modules()
                if isinstance(m, _LAYER_TYPES) and any(n == t or n.endswith("." + t) for t in targets)}
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in spec)]
        if missing:
            raise ValueError(f"LoRA: no Linear/Conv2d layer of the {what} matches {missing}")
        unnamed = [n for n in spec if (root, n) not in names]
        if unnamed:  # fail now rather than at save time
            raise ValueError(f"LoRA: {what} layers without a kohya/diffusers name cannot be targeted: {unnamed[:3]}")
        specs.append((root, spec))
    return _inject(model, specs, dropout, adapter_name)


def lora_state_dict(model: nn.Module, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The injected adapters as kohya/A1111 tensors (fp32 CPU copies), keyed with diffusers module names.

    ``values`` replaces adapter tensors by their parameter name in ``model`` (e.g. EMA weights).
    """
    values = values or {}
    names = {v: k for k, v in _index(model).items()}
    prefixes = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for root in {id(r): r for r, _ in names}.values():
        for path, layer in _lora_layers(root):
            key, full = names[(root, path)], _join(prefixes[id(root)], path)
            for adapter in layer.lora_A:
                down = values.get(f"{full}.lora_A.{adapter}.weight", layer.lora_A[adapter].weight)
                up = values.get(f"{full}.lora_B.{adapter}.weight", layer.lora_B[adapter].weight)
                out[f"{key}.lora_down.weight"] = down.detach().float().cpu().clone()
                out[f"{key}.lora_up.weight"] = up.detach().float().cpu().clone()
                out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]))
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module, values: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as :func:`merge_lora` would leave it, with ``model`` itself untouched.

    Each adapted layer is merged in a throw-away copy (one layer at a time, so the memory cost is one
    layer), so exporting after training does not change what evaluation or further training sees.
    ``values`` replaces adapter tensors by their parameter name in ``model`` (e.g. EMA weights).
    """
    values = values or {}
    state = model.state_dict()
    for name, layer in _lora_layers(model):
        for key in [k for k in state if k.startswith(f"{name}.lora_")]:
            del state[key]
        twin = copy.deepcopy(layer)
        for pname, param in twin.named_parameters():
            if _join(name, pname) in values:
                param.copy_(values[_join(name, pname)])
        twin.merge()
        state[f"{name}.weight"] = twin.get_base_layer().weight.detach()
    return state


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def save_lora(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, object] | None = None,
              values: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write :func:`lora_state_dict` (with ``values``) as safetensors, atomically (no torn file if interrupted)."""
    state = lora_state_dict(model, values)
    if not state:
        raise ValueError("save_lora: the model has no LoRA adapters (call add_lora or load_lora first)")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight")}
    alphas = {v.item() for k, v in state.items() if k.endswith(".alpha")}
    # kohya's descriptive metadata, read by A1111 / ComfyUI for display.
    meta = {"format": "pt", "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_lora(model: nn.Module, path: str | os.PathLike, scale: float = 1.0, *,
              dropout: float = 0.0, adapter_name: str = "default") -> list[nn.Parameter]:
    """Replace any adapters with those of a kohya-format file (rank/alpha from the file), at ``scale``.

    The model ends up as after :func:`add_lora` (only LoRA trainable), so training can resume from a file.
    Raises a one-line ValueError, leaving the model untouched, if the file does not fit the model.
    """
    if not math.isfinite(scale):
        raise ValueError(f"load_lora: scale must be a finite number, got {scale}")
    try:
        state = read_state_dict(path)
        if any(k.startswith(_DIFFUSERS_PREFIXES) for k in state):
            state = _from_diffusers_layout(state, checkpoint_metadata(path), os.fspath(path))
    except CheckpointError as err:
        raise ValueError(f"load_lora: {err}") from None
    for key, tensor in state.items():  # checked before the model is touched
        if not tensor.is_floating_point() and not (key.endswith(".alpha") and tensor.numel() == 1):  # int alphas: diffusers
            raise ValueError(f"load_lora: {key} in {os.fspath(path)!r} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"load_lora: {key} in {os.fspath(path)!r} holds NaN/inf values; the file is damaged")
        if key.endswith(".alpha") and not float(tensor.reshape(-1)[0]) > 0:
            raise ValueError(f"load_lora: {key} in {os.fspath(path)!r} must be positive, got {float(tensor.reshape(-1)[0])}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, kind = key.partition(".")
        groups.setdefault(module, {})[kind] = tensor
    index = _index(model, compvis_aliases=True)
    bad = sorted(m for m, g in groups.items()
                 if m not in index or set(g) - _KINDS or not {"lora_down.weight", "lora_up.weight"} <= set(g))
    if bad:
        raise ValueError(f"load_lora: {len(bad)} of {len(groups)} modules in {os.fspath(path)!r} do not match a "
                         f"layer of this model (or are not plain LoRA), e.g. {', '.join(bad[:3])}")
    targets: dict[str, tuple[nn.Module, str, int, float]] = {}
    for module, g in groups.items():
        root, name = index[module]
        layer = root.get_submodule(name)
        weight = layer.get_base_layer().weight if _is_lora(layer) else layer.weight
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        r = down.shape[0]
        if up.shape[1] != r or down.numel() != r * weight[0].numel() or up.numel() != weight.shape[0] * r:
            raise ValueError(f"load_lora: {module} has shapes down {list(down.shape)}, up {list(up.shape)} "
                             f"but the model's layer weight is {list(weight.shape)} (a LoRA for another model?)")
        targets[module] = (root, name, r, float(g["alpha"]) if "alpha" in g else float(r))
    remove_lora(model)
    specs: dict[int, tuple[nn.Module, dict[str, tuple[int, float]]]] = {}
    for root, name, r, a in targets.values():
        specs.setdefault(id(root), (root, {}))[1][name] = (r, a)
    params = _inject(model, list(specs.values()), dropout, adapter_name)
    with torch.no_grad():
        for module, (root, name, _, _) in targets.items():
            layer = root.get_submodule(name)
            for kind, sub in (("lora_down.weight", layer.lora_A), ("lora_up.weight", layer.lora_B)):
                w = sub[adapter_name].weight
                w.copy_(groups[module][kind].reshape(w.shape))  # 1x1 conv vs linear layouts interchange
    set_lora_scale(model, scale)
    return params


def has_lora(model: nn.Module) -> bool:
    """Whether any LoRA adapter is injected in ``model``."""
    return any(True for _ in _lora_layers(model))


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's delta by ``scale`` (relative to alpha / r; 0 disables, 1 is as trained)."""
    for _, layer in _lora_layers(model):
        for adapter in layer.scaling:
            layer.set_scale(adapter, scale)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the (scaled) deltas into the base weights and drop the adapters: a plain model again."""
    return _unload(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging: the base model exactly as before :func:`add_lora`."""
    return _unload(model, merge=False)
