"""Shared test helpers (imported by tests; not a test module)."""
import subprocess

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


def random_model(config, *, unet_seed: int, text_seed=None):
    """A model of ``config`` in eval mode with a re-drawn UNet (and text encoder, given ``text_seed``); the UNet's
    output convolution scaled down so its output stays near unit scale."""
    from ldm.api import build_model

    torch.manual_seed(0)
    model = build_model(config).eval()
    if text_seed is not None:
        randomize_(model.cond_stage_model, text_seed)
    randomize_(model.model.diffusion_model, unet_seed)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(0.3)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_SERVER = None


def run_main_py(argv, *, cwd, env) -> subprocess.CompletedProcess:
    """``python main.py *argv`` in ``cwd`` with environment ``env``, as a CompletedProcess, run by a fork of
    tests/main_server.py (a fresh process per run without re-importing torch and Lightning: ~10 s saved each)."""
    import atexit
    import json
    import sys
    import tempfile
    from pathlib import Path

    global _SERVER
    root = Path(__file__).resolve().parents[1]
    if _SERVER is None or _SERVER.poll() is not None:
        _SERVER = subprocess.Popen([sys.executable, str(root / "tests" / "main_server.py")], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=dict(env))
        atexit.register(_SERVER.kill)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env), "out": str(out), "err": str(err)}
        _SERVER.stdin.write(json.dumps(request) + "\n")
        _SERVER.stdin.flush()
        reply = _SERVER.stdout.readline()
        if not reply:
            raise RuntimeError("tests/main_server.py died; run main.py directly to see why")
        rc = json.loads(reply)["rc"]
        return subprocess.CompletedProcess([str(root / "main.py"), *argv], rc, out.read_text(), err.read_text())
