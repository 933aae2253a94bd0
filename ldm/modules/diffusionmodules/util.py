"""Small building blocks shared by the UNet and the diffusion process.

Beta schedules are computed with NumPy in float64 so that models build under
``with torch.device("meta")`` and the values match CompVis bit for bit.

The module offers every name of CompVis' / Stability's ``ldm.modules.diffusionmodules.util`` with the
same signatures (``make_ddim_timesteps``, ``make_ddim_sampling_parameters``, ``noise_like``,
``checkpoint`` / ``CheckpointFunction``, ``SiLU``, ``GroupNorm32``, ``HybridConditioner``, ...).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Betas as float64 NumPy. ``linear`` is linear in sqrt(beta) (diffusers' "scaled_linear")."""
    if schedule == "linear":
        betas = np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    elif schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    elif schedule == "squaredcos_cap_v2":  # Karlo's prior: the improved-DDPM cosine, as a function of t
        return betas_for_alpha_bar(n_timestep, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    elif schedule == "sqrt_linear":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    elif schedule == "sqrt":
        betas = np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use one of linear, cosine, squaredcos_cap_v2, sqrt_linear, sqrt")
    return betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Betas (float64) whose cumulative product follows ``alpha_bar(t)`` for t in [0, 1], each capped at ``max_beta``."""
    t = np.arange(num_diffusion_timesteps + 1, dtype=np.float64) / num_diffusion_timesteps
    ab = np.array([alpha_bar(float(x)) for x in t], dtype=np.float64)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


_DDIM_DISCRETIZATIONS = ("uniform", "quad")


def make_ddim_timesteps(ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int,
                        verbose: bool = True) -> np.ndarray:
    """The DDIM timesteps (ascending int array, +1 so the last step lands on ``alphas_cumprod[0]``).

    ``"uniform"`` takes every ``T // S``-th trained step, ``"quad"`` spaces them quadratically over the
    first 80 %. Where upstream works this is upstream's array exactly; two upstream bugs are fixed:

    * ``S`` not dividing ``T``: upstream took ``ceil(T / (T // S))`` steps, more than asked (30 -> 31,
      3 -> 4), and for e.g. ``S = 3`` the last one was timestep ``T``, past the schedule (an
      IndexError). Here exactly the first ``S`` of them, i.e. diffusers' "leading" spacing with
      ``steps_offset=1``; all are inside the schedule for any ``S < T``.
    * ``S == T``: upstream's steps ``1..T`` end past the schedule; here every trained step ``0..T-1``.

    ``S`` outside ``[1, T]`` is a ValueError, an unknown method NotImplementedError (as upstream).
    With leading spacing very few steps start low (``S = 1`` is the single step at timestep 1), as upstream.
    """
    if ddim_discr_method not in _DDIM_DISCRETIZATIONS:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"; '
                                  f"use one of {', '.join(_DDIM_DISCRETIZATIONS)}")
    from ldm.models.diffusion.sampling.discretization import compvis_timesteps  # lazy: that package imports this one

    steps = compvis_timesteps(ddim_discr_method, int(num_ddim_timesteps), int(num_ddpm_timesteps))
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps}")
    return steps


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta: float, verbose: bool = True):
    """``(sigmas, alphas, alphas_prev)`` of DDIM (Song et al. 2020, eq. 16) on the given timesteps.

    ``alphas = alphacums[ddim_timesteps]``, ``alphas_prev`` the level each step goes to (``alphacums[0]``
    for the last), ``sigmas = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))`` computed in float64.
    Types as upstream: for a tensor ``alphacums``, ``alphas`` is a tensor of its dtype, ``sigmas`` a
    float64 tensor and ``alphas_prev`` a float64 NumPy array; for an array, all three are arrays.
    """
    ts = np.asarray(ddim_timesteps, dtype=np.int64)
    is_tensor = isinstance(alphacums, torch.Tensor)
    ac = alphacums.detach().cpu().double().numpy() if is_tensor else np.asarray(alphacums, dtype=np.float64)
    a = ac[ts]
    alphas_prev = np.concatenate([ac[:1], ac[ts[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - a) * (1 - a / alphas_prev))
    if is_tensor:
        alphas = alphacums[torch.from_numpy(ts).to(alphacums.device)]
        sigmas = torch.from_numpy(sigmas).to(alphacums.device)
    else:
        alphas = np.asarray(alphacums)[ts]
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule "
              f"for ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps, cos half first."""
    if repeat_only:  # upstream: the timesteps themselves, repeated (their dtype kept)
        return timesteps[:, None].repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of guidance weights ``w`` [N], the input of guidance-distilled UNets (LCM's
    ``w = scale - 1``; diffusers' ``get_guidance_scale_embedding``): ``1000 w`` times frequencies spaced
    geometrically from 1 to 1/10000 inclusive, sin half first, zero-padded to an odd ``dim``."""
    half = dim // 2
    if half < 2:
        raise ValueError(f"a guidance embedding needs at least 4 dimensions, got {dim}")
    # The step is rounded to float32 before scaling the indices, as diffusers does: at w = 7.5 the arguments reach
    # 7500, where a last-bit difference in a frequency would move the sines by 1e-4.
    step = torch.tensor(math.log(10000.0) / (half - 1), dtype=torch.float32)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    args = (1000.0 * w.float())[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (statistics in half precision drift).

    bfloat16 inputs go to PyTorch's kernel directly: it accumulates the statistics in float32 itself
    (CPU and CUDA), and the round trip through a float32 copy cost more than the norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and (self.weight is None or self.weight.dtype == torch.bfloat16):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


class SiLU(nn.Module):
    """x * sigmoid(x) (upstream's module, from before PyTorch had ``nn.SiLU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _nd(kinds: dict, dims: int, what: str):
    if dims not in kinds:
        raise ValueError(f"unsupported dimensions: {dims} (a {what} takes 1, 2 or 3)")
    return kinds[dims]


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    return _nd({1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, dims, "convolution")(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    return _nd({1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}, dims, "pooling")(*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (CompVis init for output convolutions)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply a module's parameters by ``scale`` in place; returns the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all dimensions but the first (batch)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


class CheckpointFunction(torch.autograd.Function):
    """Upstream's reentrant activation checkpoint: ``CheckpointFunction.apply(func, n_inputs, *inputs, *params)``.

    The forward pass keeps no activations; the backward pass runs ``func`` again (under the autocast state
    of the forward) and returns gradients for the inputs and for ``params``. :func:`checkpoint` uses
    PyTorch's non-reentrant checkpoint instead; this class is here for code that calls it directly.
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.n_inputs = int(length)
        ctx.params = args[length:]
        ctx.autocast = {"enabled": torch.is_autocast_enabled("cuda"), "dtype": torch.get_autocast_dtype("cuda"),
                        "cache_enabled": torch.is_autocast_cache_enabled()}
        ctx.save_for_backward(*args[:length])
        with torch.no_grad():
            return run_function(*args[:length])

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad(), torch.autocast("cuda", **ctx.autocast):
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])  # views: in-place ops must not hit inputs
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        wrt = inputs + list(ctx.params)
        needs = [t.requires_grad for t in wrt]
        grads = torch.autograd.grad(outputs, [t for t, n in zip(wrt, needs) if n], output_grads, allow_unused=True)
        it = iter(grads)
        return (None, None) + tuple(next(it) if n else None for n in needs)


def checkpoint(func, inputs: tuple, params, flag: bool):
    """Activation checkpointing when ``flag`` and gradients are needed (CompVis signature)."""
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple) -> torch.Tensor:
    """Gather ``a[t]`` and reshape to broadcast over a batch of shape ``x_shape``."""
    out = a.gather(-1, t.to(a.device))
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class HybridConditioner(nn.Module):
    """Two conditioners from configs, one for ``c_concat`` and one for ``c_crossattn`` (upstream's helper)."""

    def __init__(self, c_concat_config, c_crossattn_config):
        super().__init__()
        from ldm.util import instantiate_from_config  # lazy: ldm.util imports model code

        self.concat_conditioner = instantiate_from_config(c_concat_config)
        self.crossattn_conditioner = instantiate_from_config(c_crossattn_config)

    def forward(self, c_concat, c_crossattn) -> dict:
        return {"c_concat": [self.concat_conditioner(c_concat)], "c_crossattn": [self.crossattn_conditioner(c_crossattn)]}


def noise_like(shape, device, repeat: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape``; ``repeat``: one sample shared by the whole batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device, generator=generator).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device, generator=generator)
