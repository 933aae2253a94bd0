"""Config instantiation: the CompVis schema, and targets restricted to an allowlist."""
import pytest
import torch
from omegaconf import OmegaConf

from ldm import util
from ldm.util import ConfigError, get_obj_from_str, instantiate_from_config


def test_instantiates_allowed_targets_from_omegaconf():
    cfg = OmegaConf.create({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    layer = instantiate_from_config(cfg)
    assert isinstance(layer, torch.nn.Linear) and layer.weight.shape == (2, 3)
    assert instantiate_from_config({"target": "torch.nn.Identity"}).__class__ is torch.nn.Identity
    assert instantiate_from_config("__is_unconditional__") is None


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen", "torchvision.io.read_file", "ldmx.evil.Thing"])
def test_refuses_targets_outside_the_allowlist(target):
    with pytest.raises(ConfigError) as err:
        instantiate_from_config({"target": target, "params": {}})
    msg = str(err.value)
    assert "allow_target_prefix" in msg and "\n" not in msg


def test_user_can_allow_a_package(monkeypatch):
    monkeypatch.setattr(util, "_ALLOWED_PREFIXES", list(util._ALLOWED_PREFIXES))
    with pytest.raises(ConfigError):
        get_obj_from_str("collections.OrderedDict")
    util.allow_target_prefix("collections.")
    assert get_obj_from_str("collections.OrderedDict").__name__ == "OrderedDict"


def test_clear_errors_for_bad_configs():
    with pytest.raises(ConfigError, match="no 'target' key"):
        instantiate_from_config({"params": {}})
    with pytest.raises(ConfigError, match="has no attribute"):
        instantiate_from_config({"target": "torch.nn.NoSuchLayer"})
    with pytest.raises(ConfigError, match="cannot import"):
        instantiate_from_config({"target": "ldm.models.no_such_module.Thing"})
    with pytest.raises(ConfigError, match="everything"):
        util.allow_target_prefix("")
