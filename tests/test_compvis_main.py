"""CompVis' training command line (``main.py --base it.yaml -t``) on the Hydra run: same result, honoured
``lightning:`` options, and one warning line for what cannot be honoured."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import run_main_py

ROOT = Path(__file__).resolve().parents[1]

MODEL = {
    "base_learning_rate": 1.0e-4,
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "image",
        "cond_stage_key": "txt", "image_size": 8, "channels": 4, "conditioning_key": "crossattn", "scale_factor": 1.0,
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [2],
            "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 32, "use_checkpoint": False, "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                         "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {
            "text_config": {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}}},
    },
}
DATA = {"batch_size": 4, "num_workers": 0, "wrap": False,
        "train": {"target": "ldm.data.digits.DigitsDataset", "params": {"split": "train", "size": 16}}}
STEPS = 4


def compvis_yaml(**lightning_extra) -> dict:
    return {
        "model": MODEL,
        "data": {"target": "main.DataModuleFromConfig", "params": DATA},
        "lightning": {
            "callbacks": {
                "image_logger": {"target": "main.ImageLogger", "params": {
                    "batch_frequency": 2, "max_images": 2, "increase_log_steps": False,
                    "log_images_kwargs": {"ddim_steps": 2, "N": 2, "plot_diffusion_rows": False, "inpaint": False,
                                          "plot_progressive_rows": False}}},
                "fancy": {"target": "mypkg.callbacks.FancyCallback", "params": {"level": 3}},
            },
            "modelcheckpoint": {"params": {"every_n_train_steps": 2}},
            "trainer": {"max_steps": STEPS, "accumulate_grad_batches": 2, "benchmark": True},
            **lightning_extra,
        },
    }


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _only_run(folder: Path) -> Path:
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return saved["state_dict"], saved


@pytest.mark.slow
def test_compvis_command_line_trains_like_the_hydra_spelling(tmp_path):
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(compvis_yaml()))
    res = run_main_py(["--base", "it.yaml", "-t", "--logdir", str(tmp_path / "logs"), "-n", "cv", "--seed", "5"],
                      cwd=tmp_path, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    run = _only_run(tmp_path / "logs" / "cv")
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len([w for w in warned if "lightning.callbacks.fancy" in w]) == 1, warned
    assert len(warned) == 1, warned  # everything else in this YAML is honoured

    # The same experiment in our own spelling, through Hydra.
    experiment = {"model": MODEL, "data": DATA, "loggers": ["csv"],
                  "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "accumulate_grad_batches": 2,
                              "benchmark": True},
                  "checkpoint": {"every_n_train_steps": 2}}
    (tmp_path / "cfg" / "experiment").mkdir(parents=True)
    (tmp_path / "cfg" / "experiment" / "mine.yaml").write_text("# @package _global_\n" + yaml.safe_dump(experiment))
    res2 = run_main_py(["--config-dir", str(tmp_path / "cfg"), "experiment=mine", f"out_dir={tmp_path / 'logs2'}",
                        "name=hy", "seed=5", "scale_lr=true"], cwd=tmp_path, env=_env())
    assert res2.returncode == 0, res2.stderr[-3000:]
    hydra_run = _only_run(tmp_path / "logs2" / "hy")

    ours, saved = _weights(run)
    theirs, _ = _weights(hydra_run)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    init = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert init["global_step"] == STEPS
    # accumulate_grad_batches: 2 -> two batches per optimizer step
    progress = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert progress == 2 * STEPS
    # scale_lr (CompVis' default): lr = base_lr * devices * batch_size * accumulate
    lr = saved["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1.0e-4 * 1 * 4 * 2)
    saved_cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert saved_cfg["trainer"]["accumulate_grad_batches"] == 2 and saved_cfg["trainer"]["benchmark"] is True
    # CompVis' ImageLogger: grids of log_images() at global steps 2 (batch_frequency), CompVis file names
    grids = sorted(p.name for p in (run / "images" / "train").glob("*.png"))
    assert any(n.startswith("inputs_gs-000002_") for n in grids) and any(n.startswith("samples_gs-000002_") for n in grids)
    # modelcheckpoint.every_n_train_steps: 2 -> step checkpoints (the latest kept)
    assert (run / "checkpoints" / "step-000004.ckpt").is_file()

    # -r <run> -t continues the run with the config it saved; key=value overrides use that (ldm) config's keys
    res3 = run_main_py(["-r", str(run), "-t", f"trainer.max_steps={STEPS + 2}"], cwd=tmp_path, env=_env())
    assert res3.returncode == 0, res3.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS + 2


@pytest.mark.slow
def test_compvis_command_line_user_errors_are_one_line(tmp_path):
    (tmp_path / "it.yaml").write_text(yaml.safe_dump(compvis_yaml()))
    bad_data = compvis_yaml()
    bad_data["data"]["target"] = "mypkg.MyDataModule"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad_data))
    cases = {
        ("--base", "it.yaml"): "add -t",
        ("--base", "bad.yaml", "-t"): "data.target 'mypkg.MyDataModule' is not supported",
        ("--base", "it.yaml", "-t", "--no_such_flag", "3"): "unknown option '--no_such_flag'",
        ("--base", "missing.yaml", "-t"): "missing.yaml",
    }
    for argv, expected in cases.items():
        res = run_main_py([*argv, "--logdir", str(tmp_path / "logs")], cwd=tmp_path, env=_env())
        assert res.returncode == 2, (argv, res.stderr[-2000:])
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (argv, lines)
    assert not (tmp_path / "logs").exists()


def test_trainer_options_translate_to_lightning_2():
    from ldm.compvis_train import translate_callbacks, translate_trainer

    warn: list[str] = []
    trainer, top = translate_trainer({"gpus": "0,1", "precision": 16, "accelerator": "ddp", "benchmark": True,
                                      "replace_sampler_ddp": False, "resume_from_checkpoint": "a.ckpt",
                                      "weights_summary": "top", "no_such_option": 1}, warn)
    assert trainer == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp", "precision": "16-mixed",
                       "benchmark": True, "use_distributed_sampler": False}
    assert top == {"resume": "a.ckpt"}
    assert len(warn) == 2 and "weights_summary" in warn[0] and "no_such_option" in warn[1]
    assert translate_trainer({"gpus": "0,"}, [])[0] == {"accelerator": "gpu", "devices": [0]}

    warn = []
    callbacks, checkpoint = translate_callbacks({
        "setup_callback": {"target": "main.SetupCallback", "params": {"resume": ""}},
        "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
        "metrics_over_trainsteps_checkpoint": {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                               "params": {"every_n_train_steps": 100, "save_top_k": -1}},
        "checkpoint_callback": {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                "params": {"every_n_train_steps": 50, "monitor": "val/loss"}},
    }, warn)
    assert callbacks == {
        "cuda_callback": {"target": "ldm.callbacks.CUDACallback", "params": {}},
        "metrics_over_trainsteps_checkpoint": {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                               "params": {"every_n_train_steps": 100, "save_top_k": -1}},
    }
    assert checkpoint == {"every_n_train_steps": 50}
    assert len(warn) == 1 and "checkpoint_callback.params.monitor" in warn[0]


def test_main_offers_compvis_names():
    spec = importlib.util.spec_from_file_location("compvis_main_under_test", ROOT / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.util import instantiate_from_config

    assert main.instantiate_from_config is instantiate_from_config
    dm = instantiate_from_config({"target": "main.DataModuleFromConfig", "params": {"batch_size": 2, "wrap": True}})
    assert isinstance(dm, DataModuleFromConfig) and dm.wrap
    assert main.DataModuleFromConfig is DataModuleFromConfig
    assert callable(main.ImageLogger) and callable(main.CUDACallback)


def test_compvis_image_logger_schedule():
    from ldm.callbacks import CompVisImageLogger

    logger = CompVisImageLogger(batch_frequency=8, max_images=4)
    assert [i for i in range(20) if logger.due(i)] == [1, 2, 4, 8, 16]
    logger = CompVisImageLogger(batch_frequency=8, max_images=4, increase_log_steps=False, log_first_step=True)
    assert [i for i in range(20) if logger.due(i)] == [0, 8, 16]
