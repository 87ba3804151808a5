"""Block weights: one strength factor per block group of a ComfyUI diffusion model.

The groups follow the family's block lists: UNets (SD1.5, SDXL) input / middle / output blocks
(the final `out` norm counts as output); FLUX-style models (FLUX.1/2, Chroma, HunyuanImage)
double / single blocks; other DiTs one group per known block list (AuraFlow, HiDream: two),
and a family with a single list (SD3 `joint_blocks`, Wan `blocks`, ...) its first and second
half. A site outside every group (e.g. Lumina2's refiners) keeps strength_model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from ..act import ActError
from .presets import BLOCK_LISTS

UNET_GROUPS = (
    ("input", ("input_blocks",)),
    ("middle", ("middle_block",)),
    ("output", ("output_blocks", "out")),
)
FLUX_LISTS = ("double_blocks", "single_blocks")

TOOLTIP = (
    "Optional strength factor per block group, e.g. '1, 1, 0.5' (empty: 1 everywhere); the "
    "strength at a module is strength_model x its group's weight. Groups: UNets (SD1.5, SDXL) "
    "input, middle, output blocks; FLUX-style double, single blocks; AuraFlow and HiDream their "
    "double, single lists; other DiTs (SD3, Wan, Qwen-Image, ...) the first, second half of "
    "their blocks. The node's text names the groups of the connected model."
)


@dataclass(frozen=True)
class BlockGroup:
    """A named set of modules: the given top-level blocks, or blocks `first`..`end` of one list."""

    name: str
    prefixes: tuple[str, ...]
    first: int = 0
    end: int | None = None

    def holds(self, site: str) -> bool:
        head, _, rest = site.partition(".")
        if head not in self.prefixes:
            return False
        if self.end is None:
            return True
        index = rest.partition(".")[0].partition(":")[0]
        return index.isdigit() and self.first <= int(index) < self.end


def block_groups(diffusion_model: nn.Module) -> list[BlockGroup]:
    """The block groups of a ComfyUI diffusion model, in order.

    Raises:
        ActError: the model has no block list this pack knows.
    """
    children = dict(diffusion_model.named_children())
    if all(name in children for _, names in UNET_GROUPS for name in names[:1]):
        return [BlockGroup(name, prefixes) for name, prefixes in UNET_GROUPS]
    lists = [
        name
        for name, child in children.items()
        if isinstance(child, nn.ModuleList) and (name in BLOCK_LISTS or name in FLUX_LISTS)
    ]
    if len(lists) == 1:
        (name,) = lists
        half = math.ceil(len(children[name]) / 2)
        return [
            BlockGroup(f"{name} first half", (name,), 0, half),
            BlockGroup(f"{name} second half", (name,), half, len(children[name])),
        ]
    if lists:
        return [BlockGroup(name, (name,)) for name in lists]
    raise ActError(
        f"block_weights: {type(diffusion_model).__name__} has no block list this pack knows "
        f"(looked for {', '.join(BLOCK_LISTS + FLUX_LISTS)}); leave block_weights empty"
    )


def parse_block_weights(text: str, groups: list[BlockGroup]) -> list[float] | None:
    """The weights of "1, 1, 0.5" (commas or spaces between them), one per group; None if
    `text` is empty.

    Raises:
        ActError: a word is not a finite number, or the count differs from the groups'.
    """
    words = [word for word in re.split(r"[,\s]+", text or "") if word]
    if not words:
        return None
    weights = []
    for word in words:
        try:
            value = float(word)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ActError(f"block_weights: {word!r} is not a number (in {text!r})")
        weights.append(value)
    if len(weights) != len(groups):
        raise ActError(
            f"block_weights: {len(weights)} values ({text!r}) for {len(groups)} block groups "
            f"({', '.join(group.name for group in groups)}); give one weight per group"
        )
    return weights


def site_weights(
    sites: list[str], groups: list[BlockGroup], weights: list[float] | None
) -> dict[str, float]:
    """Each site's weight: its group's, or 1 outside every group (or without weights)."""
    if weights is None:
        return dict.fromkeys(sites, 1.0)
    return {
        site: next((w for group, w in zip(groups, weights, strict=True) if group.holds(site)), 1.0)
        for site in sites
    }


def describe(groups: list[BlockGroup], weights: list[float] | None) -> str:
    """ "input 1, middle 1, output 0.5" (the groups with their weights, 1 if none given)."""
    values = weights or [1.0] * len(groups)
    return ", ".join(f"{group.name} {w:g}" for group, w in zip(groups, values, strict=True))
