"""``PLMSSampler``: CompVis' pseudo linear multistep sampler, a thin front over the sampling core."""
from __future__ import annotations

from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    sampler_name = "plms"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")
