"""Pure helpers of the node pack, tested without ComfyUI."""

import importlib
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from comfy_support import PACK, comfyui_path, load_pack, start_comfy, temporary_base
from torch import nn


@pytest.fixture(scope="module")
def helpers():
    load_pack()
    return SimpleNamespace(
        prompts=importlib.import_module(f"{PACK}.nodes.prompts"),
        presets=importlib.import_module(f"{PACK}.nodes.presets"),
        text=importlib.import_module(f"{PACK}.nodes.text_encoder"),
    )


@pytest.fixture(scope="module")
def collection():
    """nodes.collection, which imports ComfyUI (so this needs COMFYUI_PATH); ComfyUI starts
    once per process, so an earlier test module's start is reused."""
    comfyui_path()
    base = None if "folder_paths" in sys.modules else temporary_base()
    if base is not None:
        start_comfy(base)
    load_pack()
    yield SimpleNamespace(
        collection=importlib.import_module(f"{PACK}.nodes.collection"),
        diffusion=importlib.import_module(f"{PACK}.nodes.diffusion_model"),
    )
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


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


@pytest.mark.parametrize(
    ("channels", "ratio", "dimensions", "frames", "shape"),
    [
        (4, 8, 2, 9, (3, 4, 16, 8)),  # SD1.5 / SDXL at 64 x 128 pixels: no frames
        (128, 16, 2, 1, (3, 128, 8, 4)),  # FLUX.2
        (48, 16, 3, 1, (3, 48, 1, 8, 4)),  # Wan 2.2 5B: one frame
        (16, 8, 3, 9, (3, 16, 3, 16, 8)),  # Wan 2.1: 9 frames are 3 latent frames
        (64, 32, 2, 1, (3, 64, 4, 2)),  # HunyuanImage 2.1
    ],
)
def test_the_collection_latent_follows_the_models_latent_format(
    collection, channels, ratio, dimensions, frames, shape
):
    latent_format = SimpleNamespace(
        latent_channels=channels,
        spacial_downscale_ratio=ratio,
        latent_dimensions=dimensions,
        temporal_downscale_ratio=4 if dimensions == 3 else 1,
    )
    model = SimpleNamespace(get_model_object=lambda name: latent_format, model=nn.Identity())
    latent = collection.collection.collection_latent(model, 3, 64, 128, frames)
    assert tuple(latent.shape) == shape and not latent.any()


def test_single_blocks_take_their_image_tokens_from_the_models_img_slice(collection):
    from contextlib import ExitStack

    class Block(nn.Module):
        def forward(self, x, transformer_options):
            return x

    class Singles(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.single_blocks = nn.ModuleList([Block(), Block()])
            self.double_blocks = nn.ModuleList([Block()])
            self.patch_size = 2

        def forward(self, x, transformer_options):
            for block in self.single_blocks:
                x = block(x, transformer_options=transformer_options)
            return x

    model = Singles()
    diffusion = collection.diffusion
    # without img_slice: the last of the latent's 3 x 3 patches
    split = diffusion.TokenSplit.of_call(model, {"x": torch.zeros(1, 16, 6, 5)})
    assert split.image == slice(-9, None)
    assert split.joins("single_blocks.1") and not split.joins("double_blocks.0:0")
    with ExitStack() as stack:
        split.attach(model, ["single_blocks.1", "double_blocks.0:0"], stack)
        assert len(model.single_blocks[1]._forward_pre_hooks) == 1
        assert not model.single_blocks[0]._forward_pre_hooks
        # HunyuanImage: 4 prompt tokens + 3 glyph tokens, then 9 image tokens; img_slice is
        # [text tokens, all tokens]
        model(torch.zeros(1, 16, 2), transformer_options={"img_slice": [7, 16]})
    assert split.image == slice(7, 16)
    assert not model.single_blocks[1]._forward_pre_hooks


@pytest.mark.parametrize(
    ("name", "blocks", "image"),
    [
        ("MMDiT", "single_layers", slice(-6, None)),  # AuraFlow: [registers; text; image]
        ("NextDiT", "layers", slice(-6, None)),  # Lumina2, Z-Image: [caption; image]
        ("HiDreamImageTransformer2DModel", "single_stream_blocks", slice(0, 6)),
    ],
)
def test_joint_text_and_image_blocks_split_by_the_latents_patch_count(
    collection, name, blocks, image
):
    model = type(name, (nn.Module,), {})()
    model.patch_size = 2
    split = collection.diffusion.TokenSplit.of_call(model, {"x": torch.zeros(2, 4, 4, 5)})
    assert split.image == image  # 2 x 3 patches, the odd width padded
    assert split.joins(f"{blocks}.0") and not split.joins(f"double_{blocks}.0")
    tokens = torch.arange(2 * 10).reshape(2, 10, 1)
    kept = torch.cat([tokens[index] for index in split.rows([slice(0, 1)])])
    assert kept.flatten().tolist() == tokens[0, image].flatten().tolist()


def test_video_patches_count_frames_too(collection):
    model = nn.Module()
    model.patch_size = [1, 2, 2]  # HunyuanVideo
    latent = torch.zeros(1, 16, 3, 4, 6)
    assert collection.diffusion.image_token_count(model, latent) == 3 * 2 * 3
    model.patch_size = 2
    assert collection.diffusion.image_token_count(model, latent) == 3 * 2 * 3


def test_padding_never_counts_as_real_tokens_whatever_the_tokenizer(helpers):
    qwen = SimpleNamespace(end_token=None, pad_token=151643, pad_left=False)  # Qwen3, Qwen2.5-VL
    gemma = SimpleNamespace(end_token=1, pad_token=0, pad_left=True)
    clip = SimpleNamespace(tokenizer=SimpleNamespace(qwen3_4b=qwen, gemma2_2b=gemma))
    tokens = {
        "qwen3_4b": [[(10, 1.0), (11, 1.0), (151643, 1.0), (151643, 1.0), (151643, 1.0)]],
        "gemma2_2b": [[(0, 1.0), (0, 1.0), (2, 1.0), (7, 1.0), (1, 1.0)]],
    }
    masks = helpers.text.real_token_masks(clip, tokens)
    assert masks["qwen3_4b"].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    assert masks["gemma2_2b"].tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]


def test_auto_skips_vision_towers_and_attention_norms(helpers):
    encoder = nn.Module()
    encoder.visual = nn.Module()
    encoder.visual.norm = nn.LayerNorm(4)
    encoder.layer = nn.Module()
    encoder.layer.input_layernorm = nn.LayerNorm(4)
    encoder.layer.q_norm = nn.RMSNorm(4)
    assert helpers.presets.resolve_layers(encoder, "auto", "") == ["layer.input_layernorm"]
    assert "visual.norm" in helpers.presets.resolve_layers(encoder, "all norm layers", "")


def _blocks(**lists: int) -> nn.Module:
    """A module with ModuleLists of Identity blocks, e.g. `_blocks(joint_blocks=5)`."""
    model = nn.Module()
    for name, count in lists.items():
        setattr(model, name, nn.ModuleList(nn.Identity() for _ in range(count)))
    return model


def test_block_groups_follow_the_familys_block_lists():
    load_pack()
    blocks = importlib.import_module(f"{PACK}.nodes.block_weights")
    unet = _blocks(input_blocks=3, output_blocks=3)
    unet.middle_block = nn.Identity()
    groups = blocks.block_groups(unet)
    assert [group.name for group in groups] == ["input", "middle", "output"]
    sites = ["input_blocks.1.1.norm", "middle_block.1.norm", "output_blocks.0.0", "out.0"]
    weights = blocks.site_weights(sites, groups, blocks.parse_block_weights("1 0 0.5", groups))
    assert list(weights.values()) == [1.0, 0.0, 0.5, 0.5]
    flux = blocks.block_groups(_blocks(double_blocks=2, single_blocks=4))
    assert [group.name for group in flux] == ["double_blocks", "single_blocks"]
    assert flux[1].holds("single_blocks.3") and not flux[1].holds("double_blocks.0:1")
    sd3 = blocks.block_groups(_blocks(joint_blocks=5))
    assert [group.holds("joint_blocks.2:1") for group in sd3] == [True, False]
    assert [group.holds("joint_blocks.3:0") for group in sd3] == [False, True]
    assert blocks.site_weights(["x.0"], sd3, None) == {"x.0": 1.0}
    with pytest.raises(ValueError, match="no block list"):
        blocks.block_groups(_blocks(stages=2))
    with pytest.raises(ValueError, match=r"3 values .* for 2 block groups"):
        blocks.parse_block_weights("1, 1, 1", flux)
    with pytest.raises(ValueError, match="'nan' is not a number"):
        blocks.parse_block_weights("1, nan", flux)
    assert blocks.parse_block_weights("  ", flux) is None


def test_mask_layouts_of_unets_and_dits():
    load_pack()
    masking = importlib.import_module(f"{PACK}.nodes.masking")
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList()
    latent = torch.zeros(1, 4, 15, 10)
    layout = masking.TokenLayout.of_call(unet, latent, torch.zeros(1, 77, 8))
    assert layout.grid(150) == (1, 15, 10) and layout.grid(40) == (1, 8, 5)
    assert layout.text_tokens == 77 and layout.grid(77) is None
    dit = nn.Module()
    dit.patch_size = (1, 2, 2)
    video = masking.TokenLayout.of_call(dit, torch.zeros(1, 16, 3, 8, 6), None)
    assert video.grids == ((3, 4, 3),)
    with pytest.raises(ValueError, match="MASK of shape"):
        masking.as_mask(torch.zeros(2, 3, 4, 5))
