"""Shared test helpers (imported by tests; not a test module)."""
import torch


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw all parameters so activations stay O(1): weights ~ N(0, 1/fan_in), norms ~ 1 + noise.

    CompVis zero-initialises output layers; comparisons on such weights would hide wiring mistakes.
    """
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if p.dim() == 0:  # scalars (e.g. CLIP's logit_scale) keep their value
                    continue
                if p.dim() == 1:
                    base = 1.0 if (isinstance(mod, norms) and name == "weight") else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module
