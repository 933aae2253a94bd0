"""Published target names of other code bases that map onto this package's classes.

Stability's ``sgm`` YAMLs (SDXL base and refiner) name ``sgm.*`` classes; each one implemented here
is listed, so those files build unchanged without trusting any other package. A name not listed is
refused like any other target outside the allowlist.
"""
from __future__ import annotations

_SGM_NAMES = (
    "models.diffusion.DiffusionEngine",
    "models.autoencoder.AutoencoderKL",
    "models.autoencoder.AutoencoderKLInferenceWrapper",
    "modules.GeneralConditioner",
    "modules.encoders.modules.FrozenCLIPEmbedder",
    "modules.encoders.modules.FrozenOpenCLIPEmbedder2",
    "modules.encoders.modules.ConcatTimestepEmbedderND",
    "modules.diffusionmodules.openaimodel.UNetModel",
    "modules.diffusionmodules.denoiser.DiscreteDenoiser",
    "modules.diffusionmodules.denoiser_scaling.EpsScaling",
    "modules.diffusionmodules.denoiser_scaling.VScaling",
    "modules.diffusionmodules.denoiser_weighting.EpsWeighting",
    "modules.diffusionmodules.denoiser_weighting.UnitWeighting",
    "modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
)

TARGET_ALIASES: dict[str, str] = {f"sgm.{name}": f"ldm.{name}" for name in _SGM_NAMES}
# CompVis' training YAMLs name classes of its main.py.
TARGET_ALIASES.update({
    "main.DataModuleFromConfig": "ldm.data.datamodule.DataModuleFromConfig",
    "main.WrappedDataset": "ldm.data.datamodule.WrappedDataset",
    "main.ImageLogger": "ldm.callbacks.CompVisImageLogger",
    "main.CUDACallback": "ldm.callbacks.CUDACallback",
})
# CompVis' VQ first-stage YAMLs name taming-transformers' loss and quantizer.
TARGET_ALIASES.update({
    "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator": "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    "taming.modules.vqvae.quantize.VectorQuantizer2": "ldm.modules.vqvae.quantize.VectorQuantizer2",
    "taming.modules.vqvae.quantize.VectorQuantizer": "ldm.modules.vqvae.quantize.VectorQuantizer",
})
