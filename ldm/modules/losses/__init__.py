"""First-stage training losses; ``ldm.modules.losses.LPIPSWithDiscriminator`` is the CompVis config path."""
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
