"""The shared sampling core: denoiser, discretizations, guidance and solvers (see ``core.sample``)."""
from ldm.models.diffusion.sampling.core import SAMPLERS, NoiseSource, sample, sampler_names
from ldm.models.diffusion.sampling.denoiser import DiscreteDenoiser
from ldm.models.diffusion.sampling.discretization import DISCRETIZATIONS, get_sigmas

__all__ = ["SAMPLERS", "DISCRETIZATIONS", "DiscreteDenoiser", "NoiseSource", "get_sigmas", "sample", "sampler_names"]
