"""Training through main.py (Hydra + Lightning) on the tiny experiment: real runs, real checkpoints."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from tests.helpers import run_main_py

pytestmark = pytest.mark.slow  # subprocess runs of main.py / the scripts, training

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def main_py(tmp: Path, *overrides: str, run: str = "run", check: bool = True, env: dict | None = None,
            debug: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run main.py on the tiny experiment (a fork of the test main server, see tests/helpers.run_main_py);
    ``debug`` (kill_at_step, sigterm_at_step, dump_checksums) runs it through tests/run_main.py with those
    fault-injection hooks (tests/debug_hooks.py), and ``fresh`` as a plain ``python main.py``."""
    hooks = {f"LDM_TEST_{k.upper()}": str(int(v)) for k, v in (debug or {}).items()}
    argv = ["experiment=tiny", f"hydra.run.dir={tmp / run}", "loggers=[csv]", "progress_refresh=0", *overrides]
    full_env = {**ENV, **hooks, **(env or {})}
    if debug or fresh:
        script = ROOT / ("tests/run_main.py" if debug else "main.py")
        res = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, env=full_env, cwd=tmp)
    else:
        res = run_main_py(argv, cwd=tmp, env=full_env)
    if check and res.returncode != 0:
        raise AssertionError(f"main.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def test_a_few_steps_reduce_the_loss():
    cfg = OmegaConf.load(ROOT / "configs/experiment/tiny.yaml")
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 2e-3
    from ldm.data.digits import DigitsDataset

    ds = DigitsDataset(split="train", size=16)
    batch = {"image": torch.stack([ds[i]["image"] for i in range(16)]), "txt": [ds[i]["txt"] for i in range(16)]}
    model.ucg_training = {}
    x, c = model.get_input(batch, "image")
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    opt = model.configure_optimizers()
    before = model.p_losses(x, c, t, noise)[0].item()
    for _ in range(30):
        loss, _ = model.p_losses(x, c, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.p_losses(x, c, t, noise)[0].item()
    assert after < 0.7 * before, (before, after)
    # Only the UNet trained: frozen stages got no gradients.
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    assert all(p.grad is None for p in model.cond_stage_model.parameters())


def test_main_trains_checkpoints_and_exports_for_sampling(tmp_path):
    main_py(tmp_path, "trainer.max_steps=6", "checkpoint.every_n_train_steps=3")
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and "val/loss" in metrics
    assert (run / "metrics.csv").is_file()
    # The export loads strictly into the exported config and samples.
    from ldm.api import load_model
    from ldm.generation import generate

    model = load_model(run / "export" / "config.yaml", run / "export" / "model.safetensors")
    images = generate(model, ["a handwritten digit seven"], seeds=[0], height=16, width=16, steps=3, progress=False)
    assert images.shape == (1, 3, 16, 16)
    # The export holds the EMA weights, not the raw ones.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    exported = model.state_dict()["model.diffusion_model.out.2.weight"]
    assert torch.equal(exported, ckpt["model_ema.diffusion_modelout2weight"])
    assert not torch.equal(exported, ckpt["model.diffusion_model.out.2.weight"])


def test_exact_resume_after_a_crash(tmp_path):
    common = ["trainer.max_steps=8", "checkpoint.every_n_train_steps=4", "export.enabled=false", "data.validation=null"]
    main_py(tmp_path, *common, run="straight")
    crashed = main_py(tmp_path, *common, run="crashed", check=False, debug={"kill_at_step": 4})
    assert crashed.returncode == -9, crashed.stderr[-2000:]  # SIGKILLed after the step-4 checkpoint
    assert (tmp_path / "crashed" / "checkpoints" / "step-000004.ckpt").exists()
    assert not (tmp_path / "crashed" / "checkpoints" / "step-000008.ckpt").exists()
    stale = tmp_path / "crashed" / "checkpoints" / f".last.ckpt.tmp-{2 ** 30}-0123abcd"  # a kill -9 mid-write
    stale.write_bytes(b"torn")
    main_py(tmp_path, *common, f"resume={tmp_path / 'crashed'}", run="ignored")
    assert not stale.exists()  # the resumed run cleans its checkpoints folder
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "crashed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # weights and model_ema.* alike
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_sigterm_saves_stops_and_resumes_exactly(tmp_path):
    common = ["trainer.max_steps=8", "checkpoint.every_n_train_steps=100", "export.enabled=false", "data.validation=null"]
    main_py(tmp_path, *common, run="straight")
    stopped = main_py(tmp_path, *common, run="stopped", check=False, debug={"sigterm_at_step": 3})
    assert stopped.returncode == 0, stopped.stderr[-2000:]  # a clean exit, not a crash
    assert "SIGTERM: saved" in stopped.stdout
    saved = torch.load(tmp_path / "stopped/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # the signal came during step 4: that step was finished, then saved
    main_py(tmp_path, *common, f"resume={tmp_path / 'stopped'}", run="ignored")
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "stopped/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_two_process_ddp_on_cpu_agrees(tmp_path):
    main_py(tmp_path, "trainer.max_steps=3", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "export.enabled=false", "data.validation=null", debug={"dump_checksums": True},
            env={"OMP_NUM_THREADS": "1"})  # two processes on two cores: one thread each
    r0 = json.loads((tmp_path / "run" / "checksums-rank0.json").read_text())
    r1 = json.loads((tmp_path / "run" / "checksums-rank1.json").read_text())
    assert r0 == r1
    fresh = instantiate_from_config(OmegaConf.load(ROOT / "configs/experiment/tiny.yaml").model)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert r0[key] != pytest.approx(float(fresh.state_dict()[key].double().sum()))  # it did train


def test_image_folder_with_corrupt_image_and_missing_caption_trains(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 24), (40 * i, 100, 200)).save(folder / f"{i}.png")
        if i != 5:
            (folder / f"{i}.txt").write_text(f"a colour swatch number {i}")
    (folder / "broken.png").write_bytes(b"not a png at all" * 10)
    res = main_py(tmp_path, "trainer.max_steps=2", "data.batch_size=2", "export.enabled=false", "data.validation=null",
                  "~data.train", f"+data.train={{target: ldm.data.image_folder.ImageFolderDataset, params: {{root: '{folder}', size: 16}}}}")
    log = (tmp_path / "run" / "metrics.csv").read_text()
    assert "data/skipped_images" in log
    assert "skipped 1 unreadable image" in res.stdout + res.stderr


@pytest.mark.parametrize("overrides,needle", [
    (["experiment=nope"], "available experiments"),
    (["trainer.max_stepz=3"], "max_stepz"),
    (["data.batch_size=5000"], "lower data.batch_size"),
    (["experiment=digits_autoencoder_gan", "trainer.gradient_clip_val=1.0"], "clip"),  # Lightning's own refusal
    (["~data.train", "+data.train={target: ldm.data.image_folder.ImageFolderDataset, params: {root: /no/such/folder}}"],
     "/no/such/folder"),
])
def test_bad_input_is_one_clear_line(tmp_path, overrides, needle):
    res = main_py(tmp_path, *overrides, check=False)
    assert res.returncode == 2, res.stderr[-2000:]
    err = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert err[-1].startswith("error:") and needle in err[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_resume_from_another_architecture_is_refused(tmp_path):
    main_py(tmp_path, "trainer.max_steps=2", "export.enabled=false", "data.validation=null")
    res = main_py(tmp_path, f"resume={tmp_path / 'run'}", "model.params.unet_config.params.model_channels=64",
                  run="other", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "another architecture" in res.stderr and "shape mismatches" in res.stderr


def test_sweep_runs_and_gathers(tmp_path):
    args = ["-m", "experiment=tiny", "loggers=[csv]", "progress_refresh=0", "trainer.max_steps=2",
            "export.enabled=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model.base_learning_rate=1e-4,1e-3"]
    res = run_main_py(args, cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    gathered = subprocess.run([sys.executable, str(ROOT / "scripts/gather_sweep.py"), str(tmp_path / "sweep")],
                              capture_output=True, text=True, env=ENV)
    assert gathered.returncode == 0, gathered.stderr
    import csv

    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep.csv").open()))
    assert sorted(float(r["model.base_learning_rate"]) for r in rows) == [1e-4, 1e-3]
    assert all(float(r["val/loss"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lora_training_under_mixed_precision(tmp_path, precision):
    # LoRA adapts a trained model: from scratch the zero-initialised output conv (frozen under LoRA)
    # passes no gradient at all. Two full steps make it non-zero.
    main_py(tmp_path, "trainer.max_steps=2", "data.validation=null", run="base")
    main_py(tmp_path, "trainer.max_steps=3", f"trainer.precision={precision}", "lora={rank: 4, text_encoder: true}",
            "data.validation=null", f"init_from={tmp_path / 'base' / 'export' / 'model.safetensors'}")
    run = tmp_path / "run"
    from ldm.api import load_model
    from ldm.lora import load_lora

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    lora_keys = [k for k in ckpt if ".lora_" in k]
    assert lora_keys and all(ckpt[k].dtype == torch.float32 for k in lora_keys)
    assert any("cond_stage_model" in k for k in lora_keys)
    from safetensors.torch import load_file

    fresh = instantiate_from_config(OmegaConf.load(ROOT / "configs/experiment/tiny.yaml").model)
    base = load_file(tmp_path / "base" / "export" / "model.safetensors")  # the frozen starting weights
    frozen = [k for k in base if k in ckpt and not k.startswith("model_ema.")]
    assert frozen and all(torch.equal(base[k], ckpt[k]) for k in frozen), "only LoRA weights may change"
    assert any(ckpt[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k), "adapters did not train"
    # The export is the merged model, plus the adapters as a kohya-format file.
    merged = load_model(run / "export" / "config.yaml", run / "export" / "model.safetensors")
    load_lora(fresh, run / "export" / "lora.safetensors")
    assert merged is not None and (run / "export" / "lora.safetensors").stat().st_size > 0
