"""Pure helpers of the node pack, tested without ComfyUI."""

import importlib
from types import SimpleNamespace

import pytest
import torch
from comfy_support import PACK, load_pack
from torch import nn


@pytest.fixture(scope="module")
def helpers():
    load_pack()
    return SimpleNamespace(
        prompts=importlib.import_module(f"{PACK}.nodes.prompts"),
        presets=importlib.import_module(f"{PACK}.nodes.presets"),
        text=importlib.import_module(f"{PACK}.nodes.text_encoder"),
    )


def test_prompts_are_lines_without_blanks_and_comments(helpers):
    text = "  a cat \n\n# a comment\na dog\n   \n"
    assert helpers.prompts.parse_prompts(text, "source_prompts") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="source_prompts is empty"):
        helpers.prompts.parse_prompts("\n# only a comment\n", "source_prompts")


class FakeUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1)), nn.LayerNorm(4)]
        )
        self.out = nn.Sequential(nn.GroupNorm(2, 4))


class FakeFlux(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.single_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
        self.final_layer = nn.LayerNorm(4)


def test_layer_choices_resolve_per_architecture(helpers):
    resolve = helpers.presets.resolve_layers
    unet = FakeUNet()
    assert resolve(unet, "auto", "") == ["input_blocks.0.0", "input_blocks.1", "out.0"]
    assert resolve(unet, "layer norms only", "") == ["input_blocks.1"]
    assert resolve(unet, "custom regex", "out\\.0\n input_blocks\\.1 ") == [
        "out.0",
        "input_blocks.1",
    ]
    flux = resolve(FakeFlux(), "auto", "")
    assert flux == [f"double_blocks.{i}:{s}" for i in range(3) for s in (0, 1)] + [
        "single_blocks.0",
        "single_blocks.1",
    ]
    assert resolve(FakeFlux(), "all norm layers", "") == ["final_layer"]
    with pytest.raises(ValueError, match="layer_regex is empty"):
        resolve(unet, "custom regex", " ")
    with pytest.raises(ValueError, match="matches no module"):
        resolve(unet, "custom regex", "middle_block")
    with pytest.raises(ValueError, match="has no module"):
        resolve(FakeFlux(), "layer norms only", "") and resolve(
            nn.Linear(2, 2), "layer norms only", ""
        )


def test_real_tokens_run_up_to_the_first_end_token(helpers):
    text = helpers.text
    assert text.token_key("clip_l.transformer.text_model.final_layer_norm") == "l"
    assert text.token_key("t5xxl.transformer.encoder.final_layer_norm") == "t5xxl"
    clip = SimpleNamespace(tokenizer=SimpleNamespace(clip_l=SimpleNamespace(end_token=9)))
    tokens = {
        "l": [[(8, 1.0), (5, 1.0), (9, 1.0), (9, 1.0)], [(8, 1.0), (9, 1.0), (9, 1.0), (9, 1.0)]]
    }
    masks = text.real_token_masks(clip, tokens)
    assert torch.equal(masks["l"], torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]]))
    embedded = {"l": [[(8, 1.0), (torch.zeros(3), 1.0), (9, 1.0)]]}
    assert text.real_token_masks(clip, embedded)["l"].tolist() == [[1.0, 1.0, 1.0]]
