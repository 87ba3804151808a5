"""Choosing which module outputs to transport: named presets and regular expressions."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ActError
from .hooks import near_matches, split_site

SiteFinder = Callable[[nn.Module], list[str]]

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)
_NORM_SUFFIXES = ("LayerNorm", "RMSNorm", "GroupNorm")


@dataclass(frozen=True)
class Preset:
    """A named set of sites: a function of the model, plus a line for the docs.

    `family` names the front end whose models it fits ("text", "diffusers"); None for any.
    """

    name: str
    description: str
    find: SiteFinder
    family: str | None = None


PRESETS: dict[str, Preset] = {}


def register_preset(
    name: str, description: str, find: SiteFinder | Sequence[str], family: str | None = None
) -> Preset:
    """Add a preset. `find` is a function model -> sites, or a list of regular expressions;
    `family` ("text", "diffusers" or None for any model) decides where errors list it."""
    if not callable(find):
        patterns = list(find)

        def find(model: nn.Module) -> list[str]:
            return _match_patterns(model, patterns, strict=False)

    preset = Preset(name, description, find, family)
    PRESETS[name] = preset
    return preset


def is_norm(module: nn.Module) -> bool:
    """Whether a module is a normalization layer (torch's own or a model's *Norm class)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(_NORM_SUFFIXES)


def norm_sites(model: nn.Module) -> list[str]:
    """Every normalization layer of the model, in definition order."""
    return [name for name, module in model.named_modules() if name and is_norm(module)]


def layer_norm_sites(model: nn.Module) -> list[str]:
    """Every `nn.LayerNorm`, affine or not (`foldable_layer_norm_sites`: those that fold)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]


def folds_into_weights(module: nn.Module) -> bool:
    """Whether a map with support "all" on the module's output folds exactly into its own
    weights: an `nn.Linear` or `nn.LayerNorm` with a weight and a bias (see `act.baking`)."""
    return (
        isinstance(module, nn.Linear | nn.LayerNorm)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "bias", None), torch.Tensor)
    )


def foldable_layer_norm_sites(model: nn.Module) -> list[str]:
    """Every `nn.LayerNorm` with an affine weight and a bias (those without, such as the
    DiTs' `elementwise_affine=False` norms, cannot hold a map)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm) and folds_into_weights(module)
    ]


register_preset(
    "norms", "every normalization layer (LayerNorm, GroupNorm, RMSNorm, ...)", norm_sites
)


def preset_names(family: str | None = None) -> list[str]:
    """Names of the presets for a front end's models (all presets when `family` is None)."""
    return sorted(
        name
        for name, preset in PRESETS.items()
        if family is None or preset.family in (None, family)
    )


def select_modules(
    model: nn.Module, layers: str | Sequence[str], family: str | None = None
) -> list[str]:
    """Resolve presets and regular expressions to a list of sites, in definition order.

    Each entry of `layers` is a preset name (see `PRESETS`) or a regular expression that must
    match a whole module name; append `:N` to address element N of a tuple output
    (`transformer_blocks\\.\\d+:0`). A comma-free single string is one entry. `family`
    ("text", "diffusers") limits the presets that error messages suggest.

    Raises:
        ActError: an entry matches nothing (the message lists near matches and presets).
    """
    entries = [layers] if isinstance(layers, str) else list(layers)
    if not entries:
        raise ActError("no layers given: pass a preset name or a regular expression")
    sites: list[str] = []
    for entry in entries:
        found = PRESETS[entry].find(model) if entry in PRESETS else None
        if found is None:
            found = _match_patterns(model, [entry], strict=True, family=family)
        elif not found:
            raise ActError(f"preset {entry!r} found no module in {type(model).__name__}")
        sites.extend(site for site in found if site not in sites)
    return sites


def _match_patterns(
    model: nn.Module, patterns: Sequence[str], strict: bool, family: str | None = None
) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    sites: list[str] = []
    for entry in patterns:
        pattern, index = split_site(entry)
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ActError(
                f"layer pattern {entry!r} is not a valid regular expression: {error}"
            ) from None
        matched = [name for name in names if regex.fullmatch(name)]
        if strict and not matched:
            hint = near_matches(pattern, names)
            raise ActError(
                f"layer pattern {entry!r} matches no module of {type(model).__name__}"
                + (f"; near matches: {', '.join(hint)}" if hint else "")
                + f"; presets: {', '.join(preset_names(family))}"
            )
        sites.extend(name if index is None else f"{name}:{index}" for name in matched)
    return sites
