"""The conditioner layer: batch -> {crossattn, vector, concat}, dropout, and SD 1.x/2.x going through it."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.api import build_model
from ldm.modules.encoders.conditioner import Conditioner, Embedder, compvis_conditioning

ROOT = Path(__file__).resolve().parents[1]


class Fixed(Embedder):
    """Returns a fixed tensor per sample, scaled by the input (so dropout and zeroing are visible)."""

    def __init__(self, key: str, shape: tuple, **options):
        super().__init__((key,), **options)
        self.shape = shape

    def forward(self, x):
        values = torch.as_tensor(x, dtype=torch.float32)
        return values.view(-1, *[1] * len(self.shape)) * torch.ones(len(values), *self.shape)


def test_outputs_are_combined_by_rank_in_embedder_order():
    cond = Conditioner([Fixed("a", (4, 3)), Fixed("b", (5,)), Fixed("c", (4, 2)), Fixed("d", (2,)), Fixed("e", (1, 8, 8))])
    batch = {k: [1.0, 2.0] for k in "abcde"}
    out = cond(batch)
    assert out["crossattn"].shape == (2, 4, 5) and out["vector"].shape == (2, 7) and out["concat"].shape == (2, 1, 8, 8)
    assert torch.equal(out["crossattn"][1, :, :3], torch.full((4, 3), 2.0))
    zeroed = cond(batch, zero_keys=["c"])
    assert torch.equal(zeroed["crossattn"][:, :, 3:], torch.zeros(2, 4, 2))
    assert torch.equal(zeroed["crossattn"][:, :, :3], out["crossattn"][:, :, :3])
    assert set(cond(batch, kinds=["vector"])) == {"vector"}
    with pytest.raises(KeyError, match="'e'"):
        cond({k: [1.0] for k in "abcd"})
    assert compvis_conditioning(out)["c_crossattn"][0] is out["crossattn"]


def test_dropout_replaces_inputs_or_zeroes_outputs():
    legacy = Conditioner([Fixed("txt", (2, 2), ucg_rate=1.0, ucg_value=0.0)])
    assert legacy.drop({"txt": [3.0, 4.0]})["txt"] == [0.0, 0.0]
    assert Conditioner([Fixed("txt", (2, 2))]).drop({"txt": [3.0]}, {"txt": {"p": 1.0, "val": -1.0}})["txt"] == [-1.0]
    zeroing = Conditioner([Fixed("y", (3,), ucg_rate=0.5)])
    torch.manual_seed(0)
    kept = zeroing({"y": [1.0] * 4000})["vector"][:, 0]
    assert set(kept.tolist()) == {0.0, 1.0} and abs(kept.mean().item() - 0.5) < 0.05
    zeroing.eval()
    assert torch.equal(zeroing({"y": [1.0] * 10})["vector"], torch.ones(10, 3))  # no dropout when sampling


def test_sd1_goes_through_the_conditioner_with_unchanged_keys():
    torch.manual_seed(0)
    model = build_model(ROOT / "configs/tiny/tiny-sd1.yaml").eval()
    prompts = ["a cat", "a much longer prompt about a dog " * 12]
    out = model.conditioner({"txt": prompts})
    assert list(out) == ["crossattn"] and torch.equal(out["crossattn"], model.get_learned_conditioning(prompts))
    assert model.conditioner.text_encoders() == [model.cond_stage_model]
    assert not any(k.startswith("conditioner.") for k in model.state_dict())


def test_inpainting_channels_through_the_conditioner():
    torch.manual_seed(0)
    model = build_model(ROOT / "configs/tiny/tiny-sd1-inpainting.yaml").eval()
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"mask": mask, "masked_image": image * (1 - mask)}
    got = model.inpaint_conditioning(batch)
    latents = model.scale_factor * model.first_stage_model.encode(batch["masked_image"]).mode()
    expected = torch.cat([F.interpolate(mask, size=latents.shape[-2:]), latents], dim=1)
    assert torch.equal(got, expected)  # sampling: the posterior's mode, deterministic
    model.train()
    torch.manual_seed(1)
    drawn = model.inpaint_conditioning(batch)
    torch.manual_seed(1)
    sampled = model.get_first_stage_encoding(model.encode_first_stage(batch["masked_image"]))
    assert torch.equal(drawn[:, 1:], sampled)  # training: a draw, as the models were trained
