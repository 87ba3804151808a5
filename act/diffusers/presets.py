"""Layer presets for diffusers pipelines (the paper's choices), registered in `act.PRESETS`.

They resolve on the module root of `act.diffusers.anatomy.pipeline_root`, whose names are
prefixed by component (`unet.…`, `transformer.…`, `text_encoder.…`), and find nothing when
the root lacks their component.
"""

from __future__ import annotations

import inspect

from torch import nn

from ..errors import ActError
from ..selection import norm_sites, register_preset


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
