"""ldm: latent diffusion (Stable Diffusion 1.x / 2.x / SDXL) research framework, CompVis module layout."""
__version__ = "0.1.0"
