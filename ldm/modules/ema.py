"""``LitEma``: exponential moving average of a module's trainable parameters.

Buffers are named like CompVis' (``model_ema.diffusion_modelinput_blocks00weight``), so
checkpoints with EMA weights load unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int32))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        self.num_updates.zero_()

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            # Warm-up: average quickly at first so early EMA weights are not stuck at init.
            decay = min(decay, (1 + int(self.num_updates)) / (10 + int(self.num_updates)))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name and p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.lerp_(p.detach().to(s.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters) -> None:
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for stored, p in zip(self.collected_params, parameters):
            p.copy_(stored)
        self.collected_params = []

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Temporarily swap EMA weights into ``model``."""
        params = list(model.parameters())
        self.store(params)
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(params)
