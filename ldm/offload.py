"""Keep a model's weights off the accelerator and bring each part there only while it runs.

    offload = enable_offload(model, "cuda", mode="model")   # text encoders, then UNet, then VAE
    images = generate(model, prompts, seeds=[1])               # runs on cuda; weights wait on the CPU
    offload.remove()                                           # back to ordinary placement (on the CPU)

``model``: the parts (the text encoders, the UNet, the autoencoder) stay in CPU memory; when one of
them is called it moves to the device and the part that was there moves back, so the device holds
one part at a time — the text encoders together — (for SDXL at fp16 at most the UNet, about 5 GB,
instead of about 7 GB for the whole model).

``sequential``: every layer moves to the device just for its own call and back right after, so the
device holds one layer at a time (the smallest footprint, and much slower: each step moves every
weight). Weights that a module uses directly rather than through a layer's call (e.g. OpenCLIP's
positional embedding) and everything outside the parts (the noise schedule) stay on the device.

Samplers ask :func:`execution_device` where to put their tensors.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

MODES = ("none", "model", "sequential")
# Layers whose own forward uses their own weights: safe to move in just for their call.
# MultiheadAttention uses its children's weights (out_proj) in its own call: it moves as one unit.
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.GroupNorm, nn.LayerNorm,
           nn.Embedding, nn.BatchNorm2d, nn.MultiheadAttention)


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the offload device when offloaded, else where its denoiser's weights are."""
    offload = model.__dict__.get("_offload")
    if offload is not None:
        return offload.device
    inner = getattr(model, "model", None)
    for tensor in (inner if isinstance(inner, nn.Module) else model).parameters():
        return tensor.device
    return next(model.buffers(), torch.empty(0)).device


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _move_own(module: nn.Module, device: torch.device) -> None:
    """Move only the module's direct parameters and buffers (not its children's)."""
    for param in module._parameters.values():
        if param is not None and param.device != device:
            param.data = param.data.to(device)
    for name, buf in module._buffers.items():
        if buf is not None and buf.device != device:
            module._buffers[name] = buf.to(device)


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts model offload moves as units: each text encoder, the denoiser network, the autoencoder."""
    parts: dict[str, nn.Module] = {}
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        for i, encoder in enumerate(conditioner.text_encoders()):
            parts[f"text_encoder_{i}"] = encoder
    parts["unet"] = model.model
    parts["vae"] = model.first_stage_model
    return parts


class Offload:
    """Hooks that move parts (``model`` mode) or layers (``sequential`` mode) to ``device`` when called."""

    def __init__(self, models: Union[nn.Module, Sequence[nn.Module]], device: Union[str, torch.device],
                 mode: str = "model", storage: Union[str, torch.device] = "cpu") -> None:
        if mode not in MODES[1:]:
            raise ValueError(f"unknown offload mode {mode!r}; use one of {', '.join(MODES)}")
        self.models = [models] if isinstance(models, nn.Module) else list(models)
        self.mode = mode
        self.device, self.storage = torch.device(device), torch.device(storage)
        # One schedule for all the models (SDXL base + refiner share text encoder 2 and the VAE): a part
        # shared by two models is one part.
        self.parts: dict[str, nn.Module] = {}
        seen: set[int] = set()
        for k, model in enumerate(self.models):
            for name, part in model_parts(model).items():
                if id(part) not in seen:
                    seen.add(id(part))
                    self.parts[name if k == 0 else f"{name}@{k}"] = part
        self.active: list[str] = []  # parts on the device now: one, or the text encoders together
        self.moves: list[tuple[str, str]] = []  # (what, "in" | "out"), in order: how tests see the schedule
        self._handles: list[Any] = []
        in_parts = {id(m) for part in self.parts.values() for m in part.modules()}
        for model in self.models:  # the schedule and whatever lies outside the parts live on the device
            for module in model.modules():
                if id(module) not in in_parts:
                    _move_own(module, self.device)
        if mode == "model":
            for name, part in self.parts.items():
                part.to(self.storage)
                for module in part.modules():  # any call inside the part brings the whole part in
                    self._handles.append(module.register_forward_pre_hook(self._part_hook(name), with_kwargs=True))
        else:
            units: set[int] = set()  # modules moved with a unit above them
            for name, part in self.parts.items():
                for sub_name, module in part.named_modules():
                    if id(module) in units:
                        continue
                    if isinstance(module, _LAYERS):
                        units.update(id(m) for m in module.modules())
                        module.to(self.storage)
                        label = f"{name}.{sub_name}"
                        self._handles.append(module.register_forward_pre_hook(self._layer_in(label), with_kwargs=True))
                        self._handles.append(module.register_forward_hook(self._layer_out(label)))
                    elif module._parameters or module._buffers:
                        _move_own(module, self.device)
        for model in self.models:
            model.__dict__["_offload"] = self

    def _part_hook(self, name: str):
        text = name.startswith("text_encoder")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            if name not in self.active:
                # Text encoders are called in turn for the prompt and again for the negative: they share the
                # device for that phase; anything else comes in alone.
                for other in [a for a in self.active if not (text and a.startswith("text_encoder"))]:
                    self.parts[other].to(self.storage)
                    self.moves.append((other, "out"))
                    self.active.remove(other)
                self.parts[name].to(self.device)
                self.moves.append((name, "in"))
                self.active.append(name)
            return _to_device(args, self.device), _to_device(kwargs, self.device)
        return hook

    def _layer_in(self, label: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            module.to(self.device)
            self.moves.append((label, "in"))
            return _to_device(args, self.device), _to_device(kwargs, self.device)
        return hook

    def _layer_out(self, label: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            module.to(self.storage)
            self.moves.append((label, "out"))
        return hook

    def remove(self) -> None:
        """Take the hooks off and leave every weight in storage (CPU)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for model in self.models:
            model.to(self.storage)
            model.__dict__.pop("_offload", None)


def enable_offload(models: Union[nn.Module, Sequence[nn.Module]], device: Union[str, torch.device],
                   mode: str = "model") -> Optional[Offload]:
    """Offload ``models`` onto ``device`` by ``mode`` ("none" leaves them as they are and returns None)."""
    if mode == "none":
        return None
    return Offload(models, device, mode)
