"""The frozen base model of trainings that add parts to it (textual inversion tokens, LCM-LoRA adapters)."""
from __future__ import annotations

from typing import Optional

from omegaconf import OmegaConf

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import ConfigError

# The base model is used as it is; these options of its config make no sense while only new parts train.
_DROPPED = ("ckpt_path", "ignore_keys", "scheduler_config", "ucg_training")


def load_frozen_base(module: LatentDiffusion, config: Optional[str], ckpt: Optional[str], what: str) -> tuple[str, str]:
    """Run ``LatentDiffusion.__init__`` on ``module`` with the base model's config (``config``/``ckpt`` both None:
    the bundled demo model), load its weights (strict) and freeze every one of them; returns the resolved
    (config path, weights path). ``what`` names the training in error messages."""
    from ldm.api import OPTIONAL_KEYS, load_config
    from ldm.checkpoint import empty_init, load_into_model, read_state_dict, split_ema
    from ldm.run_config import resolve_model
    from ldm.util import get_obj_from_str

    config_path, ckpt_path = resolve_model(config, ckpt)
    node = load_config(config_path)
    if get_obj_from_str(node.target) is not LatentDiffusion:
        raise ConfigError(f"{what}: {config_path} builds {node.target}; only LatentDiffusion models "
                          "(SD 1.x / 2.x text-to-image, the demo) are supported")
    params = OmegaConf.to_container(node.params, resolve=True)
    for key in _DROPPED:
        params.pop(key, None)
    first_stage = params.get("first_stage_config", {}).get("params", {})
    first_stage.pop("ckpt_path", None)  # the weights file holds the first stage too
    with empty_init():  # parameters come from the file: no random initialisation
        LatentDiffusion.__init__(module, **{**params, "use_ema": False, "learn_logvar": False})
    state = read_state_dict(ckpt_path)
    names = [f"model.{n}" for n, _ in module.model.named_parameters()]
    load_into_model(module, split_ema(state, names, False), strict=True, optional_keys=OPTIONAL_KEYS)
    for p in module.parameters():
        p.requires_grad_(False)
    module._std_rescaled = True  # the base model's latent scale stays as trained
    return str(config_path), str(ckpt_path)
