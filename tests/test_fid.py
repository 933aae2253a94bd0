"""FID (ldm.fid) over a randomly initialised Inception network saved like the real weights file.

The real FID weights cannot be fetched here (and nothing may be downloaded), so the tests build
torch-fidelity's InceptionV3 with random He-initialised convolutions and save its state dict: the
same keys and shapes as the real file, loaded strictly by the same code path.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.fid import build_fid_metric, check_fid_setup, fid_from_images, to_uint8_rgb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random InceptionV3 as ``weights-inception-*.pth``; activations stay O(1) through the network."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    network = inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:
        # Build without weights: no download (there is nothing to fetch), keep the random init.
        mp.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(network, "load_state_dict", lambda self, *args, **kwargs: None)
        net = network("inception-v3-compat", ["2048"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """20 real 16x16 digit scans as [B, 3, H, W] in [0, 1]."""
    from ldm.data.digits import DigitsDataset

    ds = DigitsDataset(split="validation", size=16)
    return (ds.images[:20].permute(0, 3, 1, 2) + 1) / 2


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), straight from the definition."""
    from scipy.linalg import sqrtm

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@pytest.mark.slow
def test_fid_is_zero_against_itself_and_grows_with_the_perturbation(weights, digits):
    from ldm.fid import add_images

    real = digits[:10]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    metric = build_fid_metric(weights, reset_real_features=False)
    add_images(metric, real, real=True)
    fids = []
    for sigma in (0.0, 0.1, 0.3, 0.6):
        metric.reset()  # the generated side only
        add_images(metric, (real + sigma * noise).clamp(0, 1), real=False)
        fids.append(float(metric.compute()))
    assert fids[1] > 0 and abs(fids[0]) < 1e-3 * fids[1], fids
    assert fids[1] < fids[2] < fids[3], fids


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 10 images span 9 of the 64 feature dimensions
def test_fid_matches_the_frechet_distance_of_the_features(weights, digits):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real, fake = digits[:10], digits[10:20].flip(-1)  # other digits, mirrored
    # The 64 early features keep the definition's sqrtm cheap; the Frechet step is the same for 2048.
    ours = fid_from_images(real, fake, weights, feature=64, batch_size=4)
    # Features from torch-fidelity's own network on PNG-rounded pixels; the distance from its definition.
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(weights))
    pixels = lambda x: torch.from_numpy(np.rint(x.numpy() * 255).astype(np.uint8))  # noqa: E731
    with torch.no_grad():
        a, b = (net(pixels(x))[0].double().numpy() for x in (real, fake))
    assert ours > 0
    assert ours == pytest.approx(frechet_distance(a, b), rel=1e-4)


def test_images_are_rounded_like_saved_pngs_and_grey_becomes_rgb():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, 0.998]).reshape(1, 1, 1, 5)
    out = to_uint8_rgb(x)
    assert out.shape == (1, 3, 1, 5) and out.dtype == torch.uint8
    assert out[0, 0, 0].tolist() == [0, 128, 255, 255, 254]
    with pytest.raises(ValueError, match="B, C, H, W"):
        to_uint8_rgb(torch.zeros(3, 8, 8))


def test_missing_weights_or_package_is_a_clear_error(tmp_path, weights, digits, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth not found; fetch https://.*weights-inception"):
        fid_from_images(digits[:4], digits[4:8], tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="needs a local Inception weights file"):
        check_fid_setup(None)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        check_fid_setup(weights)


def test_wrong_weights_file_and_download_attempts_are_refused(tmp_path, weights):
    state = torch.load(weights, weights_only=True)
    state.pop("fc.bias")  # loading is strict: one key short is another file
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception weights file"):
        build_fid_metric(tmp_path / "other.pth", feature=64)
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ldm.fid import _no_downloads

    with _no_downloads(), pytest.raises(ConnectionRefusedError, match="refusing to download"):
        FrechetInceptionDistance(feature=64)  # no weights path: torch-fidelity would fetch them


def tiny_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    common = ["experiment=tiny", "name=tiny", "trainer.max_steps=2", "trainer.limit_val_batches=1", "loggers=[csv]",
              "progress_refresh=0", "export.enabled=false"]
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return compose("train", overrides=[*common, *overrides])


@pytest.mark.slow
def test_training_writes_fid_into_metrics(tmp_path, weights):
    from ldm.trainer import train

    cfg = tiny_config(f"evaluate.fid.weights={weights}", "evaluate.fid.num_samples=8", "evaluate.fid.batch_size=4",
                      "+evaluate.fid.sampling.steps=2")
    metrics = train(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["fid"] == pytest.approx(float(metrics["fid"])) and written["fid"] > 0
    assert "val/loss" in written


def test_training_with_missing_weights_fails_before_it_starts(tmp_path):
    from ldm.trainer import train

    with pytest.raises(FileNotFoundError, match="no-such-weights.pth not found"):
        train(tiny_config(f"evaluate.fid.weights={tmp_path / 'no-such-weights.pth'}"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
