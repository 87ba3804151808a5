"""Which modules of ComfyUI's models to transport, by architecture (SD1.x/2.x, SDXL, FLUX).

Module names are ComfyUI's own (`input_blocks.1.1.transformer_blocks.0.norm1`,
`double_blocks.3`, `clip_l.transformer.text_model.encoder.layers.0.layer_norm1`), which differ
from diffusers' names.
"""

from __future__ import annotations

from torch import nn

from ..act import ActError, select_modules
from ..act.selection import layer_norm_sites, norm_sites

LAYER_CHOICES = ["auto", "all norm layers", "layer norms only", "custom regex"]


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


def resolve_layers(model: nn.Module, layers: str, regex: str) -> list[str]:
    """Sites of a diffusion model or text encoder for a `layers` choice.

    "auto" is the paper's choice: all normalization layers for UNets and text encoders, the
    block outputs for FLUX; "custom regex" takes one full-match pattern per line (append
    `:N` for element N of a tuple output).
    """
    if layers == "custom regex":
        patterns = [line.strip() for line in (regex or "").splitlines() if line.strip()]
        if not patterns:
            raise ActError("layers is 'custom regex' but layer_regex is empty")
        return select_modules(model, patterns)
    if layers == "auto" and is_flux(model):
        return flux_sites(model)
    if layers in ("auto", "all norm layers"):
        sites = norm_sites(model)
    elif layers == "layer norms only":
        sites = layer_norm_sites(model)
    else:
        raise ActError(f"unknown layers choice {layers!r}; choose one of {LAYER_CHOICES}")
    if not sites:
        raise ActError(f"{type(model).__name__} has no module for the choice {layers!r}")
    return sites
