"""One progress bar for a whole run: every denoising step of every batch (and of a refiner), not one bar per call."""
from __future__ import annotations

from typing import Callable, Optional

from tqdm.auto import tqdm


class RunProgress:
    """A bar over ``batches`` x ``steps`` denoising steps; after the first batch its true step count
    (img2img runs fewer, a refiner adds some) corrects the total."""

    def __init__(self, batches: int, steps: int, enabled: bool = True, desc: str = "sampling"):
        self.batches, self.estimate = max(1, batches), steps
        self.bar = tqdm(total=self.batches * steps, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
        self.done_batches, self.steps_this_batch = 0, 0
        self.steps_done, self.total = 0, self.batches * steps  # also kept when the bar is disabled

    def callback(self, user: Optional[Callable[[dict], None]] = None) -> Callable[[dict], None]:
        """A sampling-step callback that advances the bar, then calls ``user``."""
        def on_step(info: dict) -> None:
            self.steps_this_batch += 1
            self.steps_done += 1
            self.bar.update(1)
            if user is not None:
                user(info)
        return on_step

    def batch_done(self) -> None:
        if self.done_batches == 0 and self.steps_this_batch and self.steps_this_batch != self.estimate:
            self.total = self.bar.total = self.batches * self.steps_this_batch
            self.bar.refresh()
        self.done_batches += 1
        self.steps_this_batch = 0

    def close(self) -> None:
        self.bar.close()
