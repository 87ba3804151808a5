"""Layer presets for diffusers pipelines (the paper's choices, and `exportable`: the sites
whose maps fold into a LoRA file), registered in `act.PRESETS`.

They resolve on the module root of `act.diffusers.anatomy.pipeline_root`, whose names are
prefixed by component (`unet.…`, `transformer.…`, `text_encoder.…`), and find nothing when
the root lacks their component.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from ..errors import ActError
from ..selection import foldable_layer_norm_sites, folds_into_weights, norm_sites, register_preset
from .anatomy import DENOISERS

# The Linear layers of a transformer block that write an attention or feed-forward output
# back to its tokens (names inside the block): `attn.to_out.0`, `attn.to_add_out` (the text
# stream), `attn2.to_out.0`, `ff.net.2`, `ff_context.net.2` (FLUX's double-stream blocks,
# SD3, PixArt), `ffn.net.2` (Wan), `img_mlp.net.2` and `txt_mlp.net.2` (Qwen-Image).
TOKEN_WRITERS = re.compile(
    r"attn\d?\.(to_out\.0|to_add_out)|(ff|ff_context|ffn|img_mlp|txt_mlp)\.net\.2"
)
# Block lists on text and image tokens joined (FLUX's single-stream blocks), left out so that
# the choice steers the same modules as in ComfyUI, where they do not fold.
JOINT_BLOCKS = ("single_transformer_blocks",)


def unet_norm_sites(root: nn.Module) -> list[str]:
    """Every normalization layer of the UNet (SD 1.x/2.x: 109 modules, SDXL: ~256)."""
    children = dict(root.named_children())
    unet = children.get("unet")
    return [] if unet is None else [f"unet.{name}" for name in norm_sites(unet)]


def text_encoder_norm_sites(root: nn.Module) -> list[str]:
    """Every normalization layer of every text encoder (CLIP LayerNorms, T5's RMS norms)."""
    return [
        f"{component}.{name}"
        for component, module in root.named_children()
        if component.startswith("text_encoder")
        for name in norm_sites(module)
    ]


def flux_block_sites(root: nn.Module) -> list[str]:
    """FLUX: both streams of every double-stream block (`name:0` text, `name:1` image) and of
    the first half of the single-stream blocks (one tensor each in diffusers before 0.35)."""
    transformer = dict(root.named_children()).get("transformer")
    double = getattr(transformer, "transformer_blocks", None)
    single = getattr(transformer, "single_transformer_blocks", None)
    if not isinstance(double, nn.ModuleList) or not isinstance(single, nn.ModuleList):
        return []
    sites = [
        f"transformer.transformer_blocks.{i}:{stream}"
        for i in range(len(double))
        for stream in (0, 1)
    ]
    for i in range((len(single) + 1) // 2):
        name = f"transformer.single_transformer_blocks.{i}"
        two_streams = "encoder_hidden_states" in inspect.signature(single[i].forward).parameters
        sites += [f"{name}:0", f"{name}:1"] if two_streams else [name]
    return sites


register_preset(
    "unet-norms", "diffusers UNet: every normalization layer", unet_norm_sites, "diffusers"
)
register_preset(
    "flux-blocks",
    "FLUX transformer: double-stream blocks and the first half of the single-stream blocks",
    flux_block_sites,
    "diffusers",
)
register_preset(
    "text-encoder-norms",
    "diffusers text encoders: every normalization layer (CLIP and T5)",
    text_encoder_norm_sites,
    "diffusers",
)


def token_writer_sites(transformer: nn.Module) -> list[str]:
    """The `TOKEN_WRITERS` with a bias in the block lists of a transformer, except those of
    `JOINT_BLOCKS`."""
    return [
        f"{list_name}.{index}.{name}"
        for list_name, blocks in transformer.named_children()
        if isinstance(blocks, nn.ModuleList) and list_name not in JOINT_BLOCKS
        for index, block in enumerate(blocks)
        for name, module in block.named_modules()
        if TOKEN_WRITERS.fullmatch(name) and folds_into_weights(module)
    ]


def exportable_sites(root: nn.Module) -> list[str]:
    """Sites whose maps fold into the weights (and so into a LoRA file) with support "all",
    Linear-AcT or Mean-AcT: the affine LayerNorms of a UNet and of the text encoders (CLIP's;
    T5 has none), and the `TOKEN_WRITERS` of a transformer's blocks.

    Raises:
        ActError: the denoiser, or every text encoder, has no such module (names the class).
    """
    found = {name: _exportable_in(name, module) for name, module in root.named_children()}
    encoders = [name for name in found if name.startswith("text_encoder")]
    empty = [name for name in found if name in DENOISERS and not found[name]]
    if encoders and not any(found[name] for name in encoders):
        empty += encoders
    if empty:
        modules = dict(root.named_children())
        classes = ", ".join(f"{name} ({type(modules[name]).__name__})" for name in empty)
        raise ActError(
            f"preset 'exportable' knows no module of {classes} that folds into weights "
            "(LayerNorms with an affine weight and bias; in transformer blocks, Linear layers "
            "with a bias that write an attention or feed-forward output to the tokens); steer "
            "with hooks (layers=None, act.steer), fit the other components only (where=...), "
            "or pass layers= naming nn.Linear or nn.LayerNorm modules that have a bias"
        )
    return [site for sites in found.values() for site in sites]


def _exportable_in(component: str, module: nn.Module) -> list[str]:
    """`exportable_sites` of one component, prefixed by its name."""
    if component == "transformer":
        sites = token_writer_sites(module)
    elif component == "unet" or component.startswith("text_encoder"):
        sites = foldable_layer_norm_sites(module)
    else:
        sites = []
    return [f"{component}.{site}" for site in sites]


register_preset(
    "exportable",
    "sites that fold into a LoRA file with support 'all' (UNet and CLIP affine LayerNorms, "
    "the Linear layers that write to the tokens of a transformer's blocks)",
    exportable_sites,
    "diffusers",
)


def default_layers(root: nn.ModuleDict) -> list[str]:
    """The presets `fit_pipeline` uses when no layers are given, one per kind of component."""
    layers = []
    for name, module in root.items():
        if name == "unet":
            layers.append("unet-norms")
        elif name == "transformer":
            if not flux_block_sites(root):
                raise ActError(
                    f"no default layers for a {type(module).__name__} (presets know FLUX's "
                    "blocks); pass layers= with a preset or regular expressions"
                )
            layers.append("flux-blocks")
        elif "text-encoder-norms" not in layers:
            layers.append("text-encoder-norms")
    return layers
