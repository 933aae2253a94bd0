"""Learning-rate multipliers in the CompVis config schema (used through ``LambdaLR``)."""
from __future__ import annotations

import math
from typing import Sequence


class LambdaWarmUpCosineScheduler:
    """Linear warm-up to ``lr_max`` then cosine decay to ``lr_min`` over ``max_decay_steps``."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int, verbosity_interval: int = 0):
        self.lr_warm_up_steps, self.lr_start, self.lr_min, self.lr_max = warm_up_steps, lr_start, lr_min, lr_max
        self.lr_max_decay_steps = max_decay_steps

    def schedule(self, n: int, **kwargs) -> float:
        if n < self.lr_warm_up_steps:
            return (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class _Cycles:
    """Shared bookkeeping for schedules made of repeated cycles (warm-up, then decay)."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lists = (warm_up_steps, f_min, f_max, f_start, cycle_lengths)
        if len({len(x) for x in lists}) != 1:
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.lr_warm_up_steps, self.f_min, self.f_max, self.f_start = list(warm_up_steps), list(f_min), list(f_max), list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)

    def locate(self, n: int) -> tuple[int, int]:
        """(cycle index, step inside the cycle) for global step ``n``."""
        cycle = 0
        while cycle < len(self.cycle_lengths) - 1 and n >= self.cum_cycles[cycle + 1]:
            cycle += 1
        return cycle, n - self.cum_cycles[cycle]

    def warm_up(self, cycle: int, n: int) -> float:
        return (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2(_Cycles):
    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self.locate(n)
        if n < self.lr_warm_up_steps[cycle]:
            return self.warm_up(cycle, n)
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + math.cos(t * math.pi))


class LambdaLinearScheduler(_Cycles):
    """Linear warm-up then linear change from ``f_max`` to ``f_min`` over each cycle."""

    def schedule(self, n: int, **kwargs) -> float:
        cycle, n = self.locate(n)
        if n < self.lr_warm_up_steps[cycle]:
            return self.warm_up(cycle, n)
        frac = (self.cycle_lengths[cycle] - n) / self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * frac
