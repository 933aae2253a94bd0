"""CompVis / SD 2 path of the DPM-Solver sampler: ``from ldm.models.diffusion.dpm_solver import DPMSolverSampler``."""
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
