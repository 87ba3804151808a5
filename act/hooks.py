"""Addressing module outputs: sites, module lookup, fingerprints and tensor layouts.

A *site* names one tensor a module outputs: the module's name from `named_modules()`, plus
`:index` when the module returns a tuple (e.g. `transformer_blocks.0:1`).
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ActError, ModelMismatchError


def split_site(site: str) -> tuple[str, int | None]:
    """`"name:2"` -> `("name", 2)`; `"name"` -> `("name", None)`."""
    name, sep, index = site.rpartition(":")
    if sep and index.isdigit():
        return name, int(index)
    return site, None


def group_by_module(sites: Iterable[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Sites grouped by module name, keeping order: {name: [(site, index), ...]}."""
    groups: dict[str, list[tuple[str, int | None]]] = {}
    for site in sites:
        name, index = split_site(site)
        groups.setdefault(name, []).append((site, index))
    return groups


def near_matches(wanted: str, names: Sequence[str], count: int = 5) -> list[str]:
    """Module names that look like `wanted` (for error messages)."""
    return difflib.get_close_matches(wanted, list(names), n=count, cutoff=0.5)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name`, or a ModelMismatchError listing near matches."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = near_matches(name, names)
        raise ModelMismatchError(
            f"module {name!r} not found in {type(model).__name__}"
            + (f"; near matches: {', '.join(hint)}" if hint else "")
            + f" ({len(names)} modules in all)"
        ) from None


def module_fingerprint(model: nn.Module, sites: Iterable[str]) -> dict[str, dict[str, list[int]]]:
    """Shapes of each site's module's own parameters: {site: {param: shape}}."""
    return {
        site: {
            pname: list(p.shape)
            for pname, p in resolve_module(model, split_site(site)[0]).named_parameters(
                recurse=False
            )
        }
        for site in sites
    }


def check_fingerprint(
    model: nn.Module, expected: dict[str, dict[str, list[int]]], fitted_on: str | None
) -> None:
    """Raise ModelMismatchError if a module is missing or its parameter shapes differ."""
    origin = f" (the transport was fitted on {fitted_on})" if fitted_on else ""
    for site, params in expected.items():
        name, _ = split_site(site)
        try:
            module = resolve_module(model, name)
        except ModelMismatchError as error:
            raise ModelMismatchError(f"{error}{origin}") from None
        actual = {pname: list(p.shape) for pname, p in module.named_parameters(recurse=False)}
        for pname, shape in params.items():
            if pname in actual and actual[pname] != shape:
                raise ModelMismatchError(
                    f"module {name!r}: parameter {pname!r} has shape {tuple(actual[pname])} "
                    f"in this model but {tuple(shape)} in the transport{origin}"
                )


def pick_output(output: Any, index: int | None, site: str) -> torch.Tensor:
    """The tensor a site names inside a module's output."""
    value = output if index is None else _indexed(output, index, site)
    if not isinstance(value, torch.Tensor):
        raise ActError(
            f"site {site!r} outputs {type(value).__name__}, not a tensor; "
            "address one element of a tuple output as 'name:index'"
        )
    return value


def replace_output(output: Any, index: int | None, value: torch.Tensor) -> Any:
    """A module output with the tensor at `index` (or the whole output) replaced."""
    if index is None:
        return value
    items = list(output)
    items[index] = value
    if hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*items)
    return type(output)(items)


def _indexed(output: Any, index: int, site: str) -> Any:
    if not isinstance(output, tuple | list):
        raise ActError(
            f"site {site!r} indexes the output, but the module returns "
            f"{type(output).__name__}; drop the ':{index}' suffix"
        )
    if index >= len(output):
        raise ActError(f"site {site!r}: the module returns only {len(output)} outputs")
    return output[index]


_LAST_AXIS_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.Linear)
_LAST_AXIS_SUFFIXES = ("LayerNorm", "RMSNorm")
_CHANNEL_MODULES = (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._NormBase)
_CHANNEL_SUFFIXES = ("2d", "3d")  # norms applied to channel maps (Stable Cascade's LayerNorm2d)
_holds_channel_ops: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def holds_channels(module: nn.Module, tensor: torch.Tensor, site: str = "") -> bool:
    """Whether a module output holds its units on axis 1 (channel maps (B, C, H, W), video
    (B, C, T, H, W)) rather than on its last axis.

    Outputs of fewer than 4 dimensions never do. LayerNorm, RMSNorm and Linear act on the
    last axis whatever the rank (attention q/k norms output (B, T, heads, D)), unless their
    width is on axis 1 only, or the norm is one for channel maps (`LayerNorm2d`). Any other
    module's 4-D output holds channels if the module convolves or normalizes channels.

    Raises:
        ActError: a 4-D or larger output of a module that does neither, whose units cannot
            be told apart from its other axes.
    """
    if tensor.ndim < 4:
        return False
    name = type(module).__name__
    if isinstance(module, _LAST_AXIS_MODULES) or name.endswith(_LAST_AXIS_SUFFIXES):
        width = _output_width(module)
        if width is None or tensor.shape[1] != width:
            return False
        return tensor.shape[-1] != width or name.endswith(_CHANNEL_SUFFIXES)
    if _has_channel_ops(module):
        return True
    raise ActError(
        f"the units of {site or name!r} cannot be told apart: it outputs shape "
        f"{tuple(tensor.shape)} from a {name}, which neither convolves or normalizes "
        "channels (units on axis 1) nor is a LayerNorm, RMSNorm or Linear (units on the "
        "last axis); choose a module whose output is (batch, tokens, width) or a channel map"
    )


def _output_width(module: nn.Module) -> int | None:
    """The width of the axis a last-axis module acts on, when it says."""
    if isinstance(module, nn.Linear):
        return module.out_features
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, int):
        return shape
    if isinstance(shape, tuple | list) and shape:
        return int(shape[-1])
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None


def _has_channel_ops(module: nn.Module) -> bool:
    known = _holds_channel_ops.get(module)
    if known is None:
        known = any(
            isinstance(part, _CHANNEL_MODULES) or type(part).__name__.endswith(_CHANNEL_SUFFIXES)
            for part in module.modules()
        )
        _holds_channel_ops[module] = known
    return known


def is_channel_map(tensor: torch.Tensor, channels: bool | None = None) -> bool:
    """Whether `tensor` is handled as a channel map: 4-D or more, unless `channels` (from
    `holds_channels`) says its units are on the last axis; None guesses from the rank alone."""
    return tensor.ndim >= 4 and channels is not False


def unit_axis(tensor: torch.Tensor, channels: bool | None = None) -> int:
    """Axis holding the units: 1 for channel maps (see `is_channel_map`), else the last."""
    return 1 if is_channel_map(tensor, channels) else tensor.ndim - 1


def check_width(tensor: torch.Tensor, units: int, site: str, channels: bool | None = None) -> None:
    """Raise ModelMismatchError if the tensor's unit axis is not `units` wide."""
    axis = unit_axis(tensor, channels) if tensor.ndim >= 2 else None
    if axis is None or tensor.shape[axis] != units:
        raise ModelMismatchError(
            f"module {site!r} outputs shape {tuple(tensor.shape)} (units on axis "
            f"{'?' if axis is None else axis}), but the transport has {units} units for it; "
            "the transport was fitted on another model"
        )


def can_modify_in_place(
    tensor: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict, output: Any = None
) -> bool:
    """Whether a module output may be overwritten: it must provably own its storage.

    True only without autograd, for a tensor that is not a view, and whose storage is not
    that of an input, of the module's parameters or buffers, or of another tensor of the
    same output. Anything else (a slice of a positional table, an input returned as is) is
    transported out of place, so weights and inputs are never written to.
    """
    if (tensor.requires_grad and torch.is_grad_enabled()) or tensor._base is not None:
        return False
    storage = tensor.untyped_storage().data_ptr()
    others = [*args, *kwargs.values(), *module.parameters(), *module.buffers()]
    if isinstance(output, tuple | list):
        others += [item for item in output if item is not tensor]
    return not any(
        isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() == storage for x in others
    )
