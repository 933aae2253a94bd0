"""Vector quantization for VQ first stages (taming-transformers' ``taming.modules.vqvae`` path)."""
from ldm.modules.vqvae.quantize import VectorQuantizer, VectorQuantizer2

__all__ = ["VectorQuantizer", "VectorQuantizer2"]
