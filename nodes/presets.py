"""Which modules of ComfyUI's models to transport, by architecture.

"auto" follows the paper: every normalization layer of UNets (SD1.x/2.x, SDXL) and text
encoders; for FLUX-style models (double + single stream blocks: FLUX.1/2, Chroma,
HunyuanImage) both streams of the double blocks and the first half of the single blocks; for
other DiTs (SD3 `joint_blocks`, Qwen-Image `transformer_blocks`, Lumina2/Z-Image `layers`,
Wan/PixArt/HunyuanDiT `blocks`, AuraFlow `double_layers`/`single_layers`, HiDream
`double_stream_blocks`/`single_stream_blocks`) the outputs of every block, each token stream
of a multi-stream block, found by a dry run of the model (a block that does not run, or a
stream that is not a (batch, tokens, width) tensor, is dropped). Attention q/k norms are never
chosen (models fuse them into their attention, so the modules may never run), nor the norms
of a text encoder's vision tower (Qwen2.5-VL's `visual`), which never runs for text.

"exportable (folds into a LoRA)" chooses only modules whose maps fold exactly into their
weights with support "all" (Linear-AcT or Mean-AcT), so AcT Export LoRA writes all of them:
the LayerNorms with an affine weight and bias of UNets and text encoders (CLIP's; T5 and
LLM encoders have none), and in DiTs the Linear layers with a bias that write an attention
or MLP output back to the tokens (`TOKEN_WRITERS`), outside blocks that join text and image
tokens: FLUX.1, Chroma and HunyuanImage double blocks, SD3, Wan, Qwen-Image, PixArt,
HunyuanDiT. Models without such modules (FLUX.2, Lumina2, Z-Image, AuraFlow: no biases or
joint tokens only; HiDream, Stable Cascade) raise an error that says what to do.

Module names are ComfyUI's own (`input_blocks.1.1.transformer_blocks.0.norm1`,
`double_blocks.3`, `clip_l.transformer.text_model.encoder.layers.0.layer_norm1`), which differ
from diffusers' names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from ..act import ActError, select_modules
from ..act.selection import (
    foldable_layer_norm_sites,
    folds_into_weights,
    layer_norm_sites,
    norm_sites,
)

EXPORTABLE = "exportable (folds into a LoRA)"
LAYER_CHOICES = ["auto", "all norm layers", "layer norms only", EXPORTABLE, "custom regex"]
BLOCK_LISTS = (
    "joint_blocks",
    "double_layers",
    "single_layers",
    "double_stream_blocks",
    "single_stream_blocks",
    "transformer_blocks",
    "layers",
    "blocks",
)
ATTENTION_NORMS = re.compile(r"(^|.*\.)(q_norm|k_norm|norm_q|norm_k|norm_added_q|norm_added_k)$")
# Vision towers of multimodal text encoders (Qwen2.5-VL's `visual`): they never run for text.
VISION_TOWERS = re.compile(r"(^|.*\.)(visual|vision_model|vision_tower|vision_encoder)(\..*|$)")
# Linear layers of a DiT block that write an attention or MLP output back to its tokens
# (names inside the block): FLUX-style `img_attn.proj`, `txt_mlp.2`; SD3 `x_block.attn.proj`,
# `context_block.mlp.fc2`; Wan `self_attn.o`, `cross_attn.o`, `ffn.2`; Qwen-Image
# `attn.to_out.0`, `attn.to_add_out`, `img_mlp.net.2`; PixArt `cross_attn.proj`; HunyuanDiT
# `attn1.out_proj`.
TOKEN_WRITERS = re.compile(
    r"(.*\.)?((img_|txt_|self_|cross_)?attn\d?\.(proj|o|out_proj|to_out\.0|to_add_out)"
    r"|(img_|txt_)?(mlp|ffn|ff)(\.net)?\.(2|fc2))"
)
# A dry run of the model: block module names -> the sites among them that produce tokens.
Probe = Callable[[list[str]], list[str]]


def is_flux(diffusion_model: nn.Module) -> bool:
    """Whether a ComfyUI diffusion model is a FLUX-style DiT (double + single stream blocks)."""
    return hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")


def flux_sites(diffusion_model: nn.Module) -> list[str]:
    """The paper's FLUX choice: both streams of every double block, the first half of singles.

    ComfyUI's double blocks return `(img, txt)`; single blocks return `[txt; img]` tokens,
    of which only the image tokens are pooled and steered.
    """
    doubles = len(diffusion_model.double_blocks)
    singles = len(diffusion_model.single_blocks)
    return [f"double_blocks.{i}:{stream}" for i in range(doubles) for stream in (0, 1)] + [
        f"single_blocks.{i}" for i in range(singles // 2)
    ]


def is_unet(diffusion_model: nn.Module) -> bool:
    """Whether a ComfyUI diffusion model is a UNet (input, middle and output blocks)."""
    return hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks")


def block_modules(diffusion_model: nn.Module) -> list[str]:
    """The transformer blocks of a DiT: every module in its top-level block lists."""
    return [
        f"{name}.{index}"
        for name in BLOCK_LISTS
        if isinstance(getattr(diffusion_model, name, None), nn.ModuleList)
        for index in range(len(getattr(diffusion_model, name)))
    ]


def suggested_regex(model: nn.Module) -> str:
    """A `custom regex` naming the blocks of the model's first block list (`blocks\\.\\d+`)."""
    lists = [name for name, child in model.named_children() if isinstance(child, nn.ModuleList)]
    known = [name for name in BLOCK_LISTS if name in lists]
    return f"{(known or lists or ['blocks'])[0]}\\.\\d+"


def auto_norm_sites(model: nn.Module) -> list[str]:
    """Every normalization layer but attention q/k norms and those of vision towers."""
    return [
        site
        for site in norm_sites(model)
        if not ATTENTION_NORMS.match(site) and not VISION_TOWERS.match(site)
    ]


def token_writer_sites(diffusion_model: nn.Module) -> list[str]:
    """The `TOKEN_WRITERS` with a bias in a DiT's block lists; of FLUX-style models the
    double blocks only (their single blocks join text and image tokens)."""
    lists = ("double_blocks",) if is_flux(diffusion_model) else BLOCK_LISTS
    return [
        f"{list_name}.{index}.{name}"
        for list_name in lists
        if isinstance(getattr(diffusion_model, list_name, None), nn.ModuleList)
        for index, block in enumerate(getattr(diffusion_model, list_name))
        for name, module in block.named_modules()
        if TOKEN_WRITERS.fullmatch(name) and folds_into_weights(module)
    ]


def exportable_sites(model: nn.Module) -> list[str]:
    """The sites of the "exportable" choice (see the module docstring): a DiT's token
    writers, else the affine LayerNorms but attention q/k norms and vision towers'.

    Raises:
        ActError: the model has no such module (names its class and what to do).
    """
    if is_flux(model) or (not is_unet(model) and block_modules(model)):
        sites = token_writer_sites(model)
    else:
        sites = [
            site
            for site in foldable_layer_norm_sites(model)
            if not ATTENTION_NORMS.match(site) and not VISION_TOWERS.match(site)
        ]
    if not sites:
        raise ActError(
            f"the {type(model).__name__} has no module that this choice knows to fold into a "
            "LoRA (LayerNorms with an affine weight and bias; in DiT blocks, Linear layers with "
            "a bias that write an attention or MLP output to the tokens); steer it with AcT "
            "Apply (layers 'auto'), collect from the other part only (where), or choose "
            "'custom regex' naming nn.Linear or nn.LayerNorm modules that have a bias"
        )
    return sites


def resolve_layers(
    model: nn.Module, layers: str, regex: str, probe: Probe | None = None
) -> list[str]:
    """Sites of a diffusion model or text encoder for a `layers` choice.

    "auto" is the paper's choice (see the module docstring); for a DiT's blocks it calls
    `probe`, a dry run of the model, when one is given. "custom regex" takes one full-match
    pattern per line (append `:N` for element N of a tuple output). `EXPORTABLE`: see
    `exportable_sites`.
    """
    if layers == EXPORTABLE:
        return exportable_sites(model)
    if layers == "custom regex":
        patterns = [line.strip() for line in (regex or "").splitlines() if line.strip()]
        if not patterns:
            raise ActError("layers is 'custom regex' but layer_regex is empty")
        return select_modules(model, patterns)
    if layers == "auto" and is_flux(model):
        return flux_sites(model)
    blocks = [] if is_unet(model) or probe is None else block_modules(model)
    if layers == "auto" and blocks:
        sites = probe(blocks)
        if not sites:
            raise ActError(
                f"a dry run of the {type(model).__name__} found no block that outputs tokens "
                f"among {blocks[0]!r}…{blocks[-1]!r}; choose 'custom regex' and name the "
                f"modules to steer (e.g. '{suggested_regex(model)}')"
            )
        return sites
    if layers == "auto":
        sites = auto_norm_sites(model)
    elif layers == "all norm layers":
        sites = norm_sites(model)
    elif layers == "layer norms only":
        sites = layer_norm_sites(model)
    else:
        raise ActError(f"unknown layers choice {layers!r}; choose one of {LAYER_CHOICES}")
    if not sites:
        raise ActError(
            f"{type(model).__name__} has no module for the choice {layers!r}; choose 'custom "
            f"regex' and name the modules to steer (e.g. '{suggested_regex(model)}')"
        )
    return sites
