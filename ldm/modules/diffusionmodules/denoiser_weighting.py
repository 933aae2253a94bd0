"""Per-noise-level loss weights named by ``sgm`` configs; ``EpsWeighting`` is the plain eps-MSE (weight 1 in eps space)."""
from __future__ import annotations


class EpsWeighting:
    """The SD training loss: unweighted MSE on the noise (what ``DDPM.p_losses`` computes)."""

    kind = "eps"


class UnitWeighting(EpsWeighting):
    kind = "unit"
