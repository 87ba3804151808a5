"""Folding transport maps into weights, so that steering costs nothing at inference.

A map `y -> scale * y + shift` on the output of an affine layer is exact to fold when it is
element-wise and unbounded (support "all"): for nn.Linear `W' = diag(scale) W`,
`b' = scale * b + shift`; for a norm layer with an affine weight and bias `w' = scale * w`,
`b' = scale * b + shift`. Support bounds, 4-D mean shifts and RMSNorm (no bias) are not
foldable and are refused with the reason.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ActError
from .hooks import check_fingerprint, resolve_module, split_site
from .maps import checked_strength
from .selection import is_norm
from .transport import Transport


def bake_deltas(
    model: nn.Module, transport: Transport, strength: float = 1.0
) -> dict[str, torch.Tensor]:
    """Weight deltas that fold the transport into the model at `strength`.

    Returns:
        {parameter name (e.g. "blocks.0.norm.weight"): new value - old value}, float32, on the
        parameters' devices. Nothing in the model changes.

    Raises:
        ActError: a map cannot be folded exactly (names the module and the reason).
    """
    if transport.module_params:
        check_fingerprint(model, transport.module_params, transport.model_class)
    strength = checked_strength(strength)
    holders = storage_holders(model)
    deltas: dict[str, torch.Tensor] = {}
    for site, module_map in transport.maps.items():
        name, index = split_site(site)
        module = resolve_module(model, name)
        weight, bias = _foldable_parameters(module, site, index, module_map.units)
        refuse_shared(name, (weight, bias), holders)
        try:
            coefficients = module_map.coefficients(strength)
        except ActError as error:
            raise ActError(f"module {site!r}: {error}") from None
        if coefficients.bounded:
            raise ActError(
                f"module {site!r}: the transport has support {transport.support!r}; only maps "
                "without bounds (support 'all') fold exactly into weights; use steer() instead"
            )
        scale = coefficients.scale.to(weight.device)
        shift = coefficients.shift.to(weight.device)
        old_weight = weight.detach().float()
        scale_shape = (
            (-1,) + (1,) * (old_weight.ndim - 1) if isinstance(module, nn.Linear) else (-1,)
        )
        deltas[f"{name}.weight"] = old_weight * (scale.view(scale_shape) - 1)
        deltas[f"{name}.bias"] = bias.detach().float() * (scale - 1) + shift
    return deltas


class Baked:
    """Handle on baked weights; `restore()` (or leaving a `with` block) puts the originals back."""

    def __init__(self, model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
        self._parameters = {name: model.get_parameter(name) for name in deltas}
        self._originals = {name: p.detach().clone() for name, p in self._parameters.items()}
        with torch.no_grad():
            for name, delta in deltas.items():
                parameter = self._parameters[name]
                parameter.copy_((parameter.float() + delta).to(parameter.dtype))

    def restore(self) -> None:
        """Copy the original weights back, bit for bit."""
        with torch.no_grad():
            for name, original in self._originals.items():
                self._parameters[name].copy_(original)
        self._originals.clear()

    def __enter__(self) -> Baked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def bake(model: nn.Module, transport: Transport, strength: float = 1.0) -> Baked:
    """Fold the transport into the model's weights **in place**; returns a restoring handle.

        with bake(model, transport, strength=1.0):
            model(**inputs)          # steered, at the cost of the plain model

    Raises:
        ActError: a map cannot be folded exactly; the model is left unchanged.
    """
    return Baked(model, bake_deltas(model, transport, strength))


def _memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses of the memory a tensor's elements occupy."""
    first = tensor.data_ptr()
    extent = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return first, first + (extent + 1) * tensor.element_size()


def storage_holders(model: nn.Module) -> list[tuple[int, int, str]]:
    """The memory span and name of every parameter and buffer (tied ones under each name)."""
    tensors = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    return [(*_memory_span(tensor), name) for name, tensor in tensors if tensor.numel()]


def refuse_shared(
    name: str, parameters: tuple[torch.Tensor, ...], holders: list[tuple[int, int, str]]
) -> None:
    """Raise if a parameter to fold overlaps in memory with another module's (tied weights):
    folding the map would change that module too."""
    for parameter in parameters:
        first, last = _memory_span(parameter)
        owners = {owner for start, end, owner in holders if start < last and first < end}
        others = sorted({owner.rpartition(".")[0] for owner in owners} - {name})
        if others:
            raise ActError(
                f"module {name!r} shares its parameters with {', '.join(map(repr, others))} "
                "(tied weights): folding its map would change those modules too; steer it "
                "with hooks (act.steer) instead"
            )


def _foldable_parameters(
    module: nn.Module, site: str, index: int | None, units: int
) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight, bias) that hold the module's output map, or an ActError with the reason."""
    if index is not None:
        raise ActError(f"module {site!r}: maps on one element of a tuple output cannot be folded")
    if isinstance(module, nn.GroupNorm | nn.modules.conv._ConvNd | nn.modules.batchnorm._BatchNorm):
        raise ActError(
            f"module {site!r} ({type(module).__name__}) outputs channel maps, which are "
            "steered by a data-dependent mean shift that cannot be folded into weights"
        )
    kind = type(module).__name__
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.Linear):
        width = module.out_features
    elif isinstance(module, nn.LayerNorm):
        width = module.normalized_shape[-1]
    elif is_norm(module) and bias is None:
        raise ActError(
            f"module {site!r} ({kind}) has no bias, so the shift of the map has nowhere to go; "
            "steer it with hooks instead"
        )
    else:
        raise ActError(
            f"module {site!r} is a {kind}; only nn.Linear and nn.LayerNorm outputs (with "
            "weight and bias) can be folded exactly; steer it with hooks instead"
        )
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise ActError(
            f"module {site!r} ({kind}) has no {'weight' if weight is None else 'bias'}; "
            "folding needs both to hold the scale and the shift"
        )
    if width != units:
        raise ActError(f"module {site!r} has {width} outputs but the transport has {units} units")
    return weight, bias
