"""Exporting a transport as a LoRA file of weight differences that stock loaders apply.

For an element-wise map with support "all" on the output of a layer with an affine weight
and bias (nn.Linear, nn.LayerNorm), `T_s(a) = a + s((omega - 1) a + beta)` folds into
`w' = w + s (omega - 1) w` and `b' = b + s((omega - 1) b + beta)`: the change of the weights
is linear in the strength s for s >= 0. So the differences at strength 1, stored as
`<key>.diff` (weight) and `<key>.diff_b` (bias), and loaded with a LoRA loader at strength s,
are the transport applied at strength s. Mean-AcT (omega = 1) on the channels of a layer
that adds a bias per channel last (GroupNorm, BatchNorm, convolutions) shifts every pixel of
a channel by the same `s * beta`: it folds into the bias alone, also for s < 0.

Sites that cannot fold are listed by name with the reason; they are exported only when the
caller allows a partial file, and the file says which were left out.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .baking import bake_deltas, refuse_shared, storage_holders
from .errors import ActError, ModelMismatchError
from .files import write_atomically
from .hooks import check_fingerprint, resolve_module, split_site
from .maps import ModuleMap, Support, checked_strength
from .transport import Transport

WEIGHT_SUFFIX = ".diff"
BIAS_SUFFIX = ".diff_b"
METADATA_KEY = "act_export"
REMEDY = "refit it with support 'all' to export it, or steer with hooks (act.steer, AcT Apply)"
_CHANNEL_BIAS_MODULES = (
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.conv._ConvNd,
)


@dataclass
class LoraWeights:
    """The tensors of a LoRA file and what they hold.

    Attributes:
        tensors: {"<key>.diff": weight difference, "<key>.diff_b": bias difference}, float32.
        folded: the sites folded into `tensors`, in the transport's order.
        left_out: {site: why it cannot be folded} for the other sites.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    folded: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def merged(self, other: LoraWeights) -> LoraWeights:
        """Both parts in one (keys must not collide)."""
        clash = sorted(set(self.tensors) & set(other.tensors))
        if clash:
            raise ActError(f"two parts of the export write the same keys: {clash[:3]}")
        return LoraWeights(
            {**self.tensors, **other.tensors},
            [*self.folded, *other.folded],
            {**self.left_out, **other.left_out},
        )


@dataclass(frozen=True)
class LoraExport:
    """What `export_lora` / `save_lora` wrote: the file, the sites folded and those left out."""

    path: str
    folded: list[str]
    left_out: dict[str, str]
    strength: float

    def summary(self) -> str:
        """A few lines for people: the file, the sites in it and those left out, with why."""
        lines = [
            f"wrote {os.path.basename(self.path)}: {len(self.folded)} modules "
            f"(LoRA strength 1 = AcT strength {self.strength:g})"
        ]
        if self.left_out:
            lines.append(f"left out {len(self.left_out)} modules that cannot be folded:")
            lines += [f"- {reason}" for reason in self.left_out.values()]
        return "\n".join(lines)


def lora_weights(
    model: nn.Module,
    transport: Transport,
    strength: float = 1.0,
    *,
    key_prefix: str = "",
    site_prefix: str = "",
) -> LoraWeights:
    """Weight differences that fold the transport into `model` at `strength`, per LoRA key.

    The key of the module `name` is `key_prefix + name`; its differences are stored as
    `<key>.diff` and `<key>.diff_b`. A weight difference that is exactly zero (Mean-AcT) is
    left out of the file. Nothing in the model changes.

    Args:
        model: the module whose submodules the transport's sites name.
        transport: the maps to fold.
        strength: the strength the differences hold (a loader's strength multiplies it).
        key_prefix: prepended to module names to make the file's keys.
        site_prefix: prepended to sites in `folded` and `left_out` (the names users know).

    Returns:
        The tensors, the sites folded and, by site, why the others cannot be folded.

    Raises:
        ModelMismatchError: the transport was fitted on another model.
        ActError: the strength is not a finite number, or the transport has support bounds.
    """
    strength = checked_strength(strength)
    refuse_bounds(transport)
    if transport.module_params:
        check_fingerprint(model, transport.module_params, transport.model_class)
    weights = LoraWeights()
    for site, module_map in transport.maps.items():
        try:
            deltas = _site_deltas(model, transport, site, module_map, strength)
        except ModelMismatchError:
            raise
        except ActError as error:
            named = str(error).replace(repr(site), repr(site_prefix + site), 1)
            weights.left_out[site_prefix + site] = named
            continue
        for parameter, delta in deltas.items():
            if parameter.endswith(".weight") and not delta.any():
                continue
            key = key_prefix + parameter.removesuffix(".weight").removesuffix(".bias")
            suffix = WEIGHT_SUFFIX if parameter.endswith(".weight") else BIAS_SUFFIX
            weights.tensors[key + suffix] = delta.detach().float().cpu().contiguous()
        weights.folded.append(site_prefix + site)
    return weights


def save_lora(
    weights: LoraWeights,
    path: str | os.PathLike,
    *,
    strength: float = 1.0,
    overwrite: bool = False,
    allow_partial: bool = False,
    info: Mapping[str, Any] | None = None,
) -> LoraExport:
    """Write LoRA weights as a safetensors file, atomically (see `act.files`).

    The file's metadata entry `act_export` (JSON) holds the strength, the sites folded, the
    sites left out with the reason, and `info` (e.g. the transport's description).

    Raises:
        ActError: the path does not end with .safetensors, exists and `overwrite` is off, or
            cannot be written; some sites cannot be folded and `allow_partial` is off; no site
            can be folded. Nothing is written then.
    """
    target = check_target(path, overwrite, suffix=".safetensors")
    if (weights.left_out and not allow_partial) or not weights.folded:
        raise ActError(_unfoldable_message(weights))
    metadata = {
        "strength": strength,
        "folded": weights.folded,
        "left_out": weights.left_out,
        **dict(info or {}),
    }
    data = safetensors_bytes(weights.tensors, metadata={METADATA_KEY: json.dumps(metadata)})
    try:
        write_atomically(target, data)
    except OSError as error:
        raise ActError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
    return LoraExport(str(target), list(weights.folded), dict(weights.left_out), strength)


def export_lora(
    transport: Transport,
    model_or_pipeline: Any,
    path: str | os.PathLike,
    strength: float = 1.0,
    *,
    overwrite: bool = False,
    allow_partial: bool = False,
) -> LoraExport:
    """Write the transport as a LoRA file of weight differences (`<key>.diff`, `.diff_b`).

    A LoRA loader at strength s then applies the transport at `strength` x s (exact for
    s >= 0; below 0 a loader extrapolates linearly, which is AcT's inverse map only for
    Mean-AcT). Keys are the transport's module names: for a torch module its own module
    names, for a pipeline (anything with a `components` mapping, such as a diffusers
    pipeline) `<component>.<module>`, as the transport's sites are written.

    Args:
        transport: maps with support "all" on Linear or LayerNorm outputs, or Mean-AcT on
            channel maps of layers with a bias.
        model_or_pipeline: the model (or pipeline) the transport was fitted on.
        path: the .safetensors file to write.
        strength: the strength the file holds at loader strength 1.
        overwrite: replace an existing file.
        allow_partial: export the foldable sites only when some cannot be folded; the
            result's `left_out` (and the file's metadata) says which, and why.

    Raises:
        ActError: see `save_lora`; ModelMismatchError: the transport is for another model.
    """
    strength = checked_strength(strength)
    check_target(path, overwrite, suffix=".safetensors")
    weights = LoraWeights()
    for name, module in _components(model_or_pipeline).items():
        part = transport.component(name) if name else transport
        if part is None:
            continue
        prefix = f"{name}." if name else ""
        weights = weights.merged(
            lora_weights(module, part, strength, key_prefix=prefix, site_prefix=prefix)
        )
    unclaimed = sorted(set(transport.sites) - set(weights.folded) - set(weights.left_out))
    if unclaimed:
        raise ModelMismatchError(
            f"sites {unclaimed[:3]} name no component of this pipeline "
            f"({', '.join(_components(model_or_pipeline))}); the transport was fitted elsewhere"
        )
    return save_lora(
        weights,
        path,
        strength=strength,
        overwrite=overwrite,
        allow_partial=allow_partial,
        info=transport_info(transport),
    )


def transport_info(transport: Transport) -> dict[str, Any]:
    """The transport's fields a LoRA file's metadata repeats (method, support, model...)."""
    return {
        "method": transport.method,
        "support": transport.support,
        "model_class": transport.model_class,
        "description": str(transport.info.get("description") or ""),
    }


def refuse_bounds(transport: Transport, remedy: str = REMEDY) -> None:
    """An ActError for a transport whose maps apply only inside bounds (support not 'all');
    `remedy` says how to get one that folds."""
    if Support.parse(transport.support).level is not None:
        raise ActError(
            f"the transport has support {transport.support!r}: it moves an activation only "
            f"inside the source's range, which no weight can do; {remedy}"
        )


def check_target(path: str | os.PathLike, overwrite: bool, suffix: str | None = None) -> Path:
    """`path` as a Path if it may be written: with `suffix`, and not existing unless
    `overwrite`; else an ActError naming it."""
    target = Path(path)
    if suffix is not None and target.suffix != suffix:
        raise ActError(f"{str(target)!r} must end with {suffix}")
    if target.exists() and not overwrite:
        raise ActError(
            f"{str(target)!r} exists; overwrite it (overwrite=True) or choose another name"
        )
    return target


def _site_deltas(
    model: nn.Module, transport: Transport, site: str, module_map: ModuleMap, strength: float
) -> dict[str, torch.Tensor]:
    """{parameter name: difference} folding one site, or an ActError with the reason."""
    name, index = split_site(site)
    module = resolve_module(model, name)
    if index is None and isinstance(module, _CHANNEL_BIAS_MODULES):
        return _channel_shift_deltas(model, name, site, module, module_map, strength)
    return bake_deltas(model, transport.subset([site]), strength)


def _channel_shift_deltas(
    model: nn.Module,
    name: str,
    site: str,
    module: nn.Module,
    module_map: ModuleMap,
    strength: float,
) -> dict[str, torch.Tensor]:
    """Mean-AcT on channel maps: every pixel of channel c moves by `shift[c]`, so the shift
    goes into the bias the module adds per channel last."""
    kind = type(module).__name__
    coefficients = module_map.coefficients(strength)
    if coefficients.bounded:
        raise ActError(
            f"module {site!r}: the map has bounds (a support other than 'all'), so it moves a "
            "channel only when its mean is inside them: that depends on the input and cannot "
            "be folded into weights"
        )
    if not torch.all(module_map.omega == 1):
        raise ActError(
            f"module {site!r} ({kind}) outputs channel maps, moved by T(m) - m of their spatial "
            "mean m, which depends on the input unless omega = 1: only Mean-AcT folds there"
        )
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise ActError(f"module {site!r} ({kind}) has no bias to hold the shift of the map")
    if bias.shape != (module_map.units,):
        raise ActError(
            f"module {site!r} has {bias.numel()} channels but the transport has "
            f"{module_map.units} units"
        )
    refuse_shared(name, (bias,), storage_holders(model))
    return {f"{name}.bias": coefficients.shift.to(bias.device)}


def _components(model_or_pipeline: Any) -> dict[str, nn.Module]:
    """{component name: module}: {"": model} for a torch module, else a pipeline's modules."""
    if isinstance(model_or_pipeline, nn.Module):
        return {"": model_or_pipeline}
    components = getattr(model_or_pipeline, "components", None)
    if isinstance(components, Mapping):
        return {name: part for name, part in components.items() if isinstance(part, nn.Module)}
    raise ActError(
        f"cannot export for a {type(model_or_pipeline).__name__}: pass a torch module or a "
        "pipeline with a `components` mapping (e.g. a diffusers pipeline)"
    )


def _unfoldable_message(weights: LoraWeights) -> str:
    """Every site that cannot be folded, with the reason, and what to do."""
    count, folded = len(weights.left_out), len(weights.folded)
    reasons = "".join(f"\n- {reason}" for reason in weights.left_out.values())
    partial = f"export the other {folded} only with allow_partial, or " if folded else ""
    return (
        f"{count} of {count + folded} modules cannot be folded exactly into weights "
        f"({partial}refit with support 'all' on layers that fold: layer norms and Linear "
        f"outputs, or Mean-AcT on channel norms):{reasons}"
    )
