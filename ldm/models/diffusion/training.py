"""The Lightning training surface of the diffusion models, kept apart from the math.

``DDPM`` mixes this in; it supplies ``shared_step`` (the loss), ``model`` and optional
``model_ema``. Nothing here is needed to sample.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch

from ldm.util import instantiate_from_config


class DiffusionTrainingMixin:
    learning_rate: float = 1.0e-4

    @contextmanager
    def ema_scope(self, context: Optional[str] = None):
        """Run the block with EMA weights swapped in (no-op without EMA)."""
        if not getattr(self, "use_ema", False):
            yield
            return
        with self.model_ema.average_parameters(self.model):
            yield

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log("global_step", float(self.global_step), prog_bar=False, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, loss_dict = self.shared_step(batch)
        self.log_dict(loss_dict, on_step=False, on_epoch=True, sync_dist=True)
        if getattr(self, "use_ema", False):
            with self.ema_scope():
                _, loss_dict_ema = self.shared_step(batch)
            self.log_dict({f"{k}_ema": v for k, v in loss_dict_ema.items()}, on_step=False, on_epoch=True, sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # scale_by_std: set the latent scale so the first batch's latents have unit std.
        if getattr(self, "scale_by_std", False) and self.global_step == 0 and batch_idx == 0 and not getattr(self, "_std_rescaled", False):
            with torch.no_grad():
                x = self.get_input(batch, self.first_stage_key)[0] / self.scale_factor
                self.scale_factor.copy_(1.0 / x.flatten().std())
            self._std_rescaled = True

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA follows every real optimizer step (so gradient accumulation is respected) and is
        # updated before callbacks run: a checkpoint taken at step N holds the EMA of step N.
        super().optimizer_step(*args, **kwargs)
        if getattr(self, "use_ema", False):
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Whatever requires grad: the UNet, a trainable cond stage, LoRA adapters, a learned logvar."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; check cond_stage_trainable / lora settings")
        return params

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not getattr(self, "use_scheduler", False):
            return optimizer
        scheduler = instantiate_from_config(self.scheduler_config)
        lr_lambda = scheduler.schedule if hasattr(scheduler, "schedule") else scheduler
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda), "interval": "step", "frequency": 1},
        }
