"""Steering a torch model: forward hooks that transport module outputs at a given strength.

Token-shaped outputs (..., D) get the element-wise map `a + s(T(a) - a)` on the support;
so do outputs of 4 or more dimensions of LayerNorm, RMSNorm and Linear (e.g. attention q/k
norms, (B, T, heads, D)), whose units are on the last axis (see `act.hooks.holds_channels`).
Channel maps (B, C, H, W) get every pixel of a channel shifted by `T_s(m) - m`, m the channel's
spatial mean (gated on m being inside the support), as in the reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .claims import claim, release
from .errors import ActError
from .hooks import (
    can_modify_in_place,
    check_fingerprint,
    check_width,
    group_by_module,
    holds_channels,
    is_channel_map,
    pick_output,
    replace_output,
    resolve_module,
)
from .maps import Coefficients, ModuleMap, checked_strength
from .transport import Transport

RowSelector = Callable[[int], Sequence[slice] | None]


def transport_in_place(
    tensor: torch.Tensor, coefficients: Coefficients, channels: bool | None = None
) -> None:
    """Apply coefficients to `tensor` **in place**, computing in float32 (no autograd).

    `channels`: whether a 4-D/5-D tensor is a channel map (None: it is); otherwise the map
    applies element-wise along the last axis.

    The support gate uses float 0/1 masks (`a + mask * (T_s(a) - a)`): on CPUs, comparisons
    and selects through bool tensors cost several times more than float arithmetic.
    """
    scale, shift = coefficients.scale, coefficients.shift
    if is_channel_map(tensor, channels):
        tensor.add_(_channel_shift(tensor, coefficients).to(tensor.dtype))
        return
    work = tensor if tensor.dtype == torch.float32 else tensor.float()
    if coefficients.bounded:
        inside = torch.gt(work, coefficients.lo, out=torch.empty_like(work))
        buffer = torch.lt(work, coefficients.hi, out=torch.empty_like(work))
        inside.mul_(buffer)
        delta = torch.addcmul(shift, work, coefficients.scale_minus_one, out=buffer)
        work.addcmul_(delta, inside)
    else:
        torch.addcmul(shift, work, scale, out=work)
    if work is not tensor:
        tensor.copy_(work)


def transported(
    tensor: torch.Tensor, coefficients: Coefficients, channels: bool | None = None
) -> torch.Tensor:
    """Out-of-place version of `transport_in_place` (differentiable)."""
    if is_channel_map(tensor, channels):
        return tensor + _channel_shift(tensor, coefficients).to(tensor.dtype)
    moved = (tensor.float() * coefficients.scale + coefficients.shift).to(tensor.dtype)
    if not coefficients.bounded:
        return moved
    return torch.where((tensor > coefficients.lo) & (tensor < coefficients.hi), moved, tensor)


def _channel_shift(tensor: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """`T_s(m) - m` per sample and channel (m the spatial mean), broadcastable over space."""
    spatial = tuple(range(2, tensor.ndim))
    mean = tensor.mean(dim=spatial, dtype=torch.float32)
    delta = torch.addcmul(coefficients.shift, mean, coefficients.scale_minus_one)
    if coefficients.bounded:
        inside = (mean > coefficients.lo) & (mean < coefficients.hi)
        delta = torch.where(inside, delta, 0.0)
    return delta.view(*delta.shape, *(1,) * len(spatial))


class Steering:
    """Hooks that steer a model with a transport; remove them with `remove()` or `with`.

    Prefer `steer(...)`, which constructs this. `strength` may be changed at any time; the
    hooks read it on every call. `calls` counts the module calls that were steered, so a
    caller can tell a steering that never fired (modules that did not run) from one that did.
    """

    def __init__(
        self,
        model: nn.Module,
        transport: Transport,
        strength: float = 1.0,
        *,
        active: Callable[[], bool] | None = None,
        rows: RowSelector | None = None,
    ) -> None:
        if transport.module_params:
            check_fingerprint(model, transport.module_params, transport.model_class)
        groups = group_by_module(transport.sites)
        modules = {name: resolve_module(model, name) for name in groups}
        self.transport = transport
        self.active = active
        self.rows = rows
        self.calls = 0
        self._strength = 0.0
        self._coefficients: dict[tuple[str, torch.device], Coefficients] = {}
        self.strength = strength
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules = list(modules.values())
        claim(modules, id(self))
        try:
            for name, sites in groups.items():
                hook = _ModuleHook(
                    self, [(site, index, transport.maps[site]) for site, index in sites]
                )
                self._handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    @property
    def strength(self) -> float:
        """Transport strength: 0 off, 1 full map, >1 extrapolation, <0 the inverse map."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        value = checked_strength(value)
        coefficients = {}
        for site, module_map in self.transport.maps.items():
            try:
                coefficients[site] = module_map.coefficients(value)
            except ActError as error:
                raise ActError(f"site {site!r}: {error}") from None
        self._strength = value
        self._coefficients = {(site, torch.device("cpu")): c for site, c in coefficients.items()}

    def coefficients(self, site: str, module_map: ModuleMap, device: torch.device) -> Coefficients:
        """Coefficients of a site at the current strength on `device` (cached)."""
        key = (site, device)
        cached = self._coefficients.get(key)
        if cached is None:
            cached = self._coefficients[(site, torch.device("cpu"))].to(device)
            self._coefficients[key] = cached
        return cached

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook; the model computes exactly as before."""
        while self._handles:
            self._handles.pop().remove()
        release(self._modules, id(self))

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _ModuleHook:
    """Forward hook of one module, transporting each of its sites."""

    def __init__(self, steering: Steering, sites: list[tuple[str, int | None, ModuleMap]]) -> None:
        self.steering = steering
        self.sites = sites

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        steering = self.steering
        if steering.strength == 0 or (steering.active is not None and not steering.active()):
            return None
        steering.calls += 1
        for site, index, module_map in self.sites:
            tensor = pick_output(output, index, site)
            channels = holds_channels(module, tensor, site)
            check_width(tensor, module_map.units, site, channels)
            coefficients = steering.coefficients(site, module_map, tensor.device)
            selected = None if steering.rows is None else steering.rows(tensor.shape[0])
            if can_modify_in_place(tensor, module, args, kwargs, output):
                for region in [tensor] if selected is None else [tensor[r] for r in selected]:
                    transport_in_place(region, coefficients, channels)
            elif selected is None:
                moved = transported(tensor, coefficients, channels)
                output = replace_output(output, index, moved)
            else:
                tensor = tensor.clone()
                for rows in selected:
                    tensor[rows] = transported(tensor[rows], coefficients, channels)
                output = replace_output(output, index, tensor)
        return output


def steer(
    model: nn.Module,
    transport: Transport,
    strength: float = 1.0,
    *,
    active: Callable[[], bool] | None = None,
    rows: RowSelector | None = None,
) -> Steering:
    """Steer `model` with `transport` until the returned handle is removed.

    Use as a context manager; hooks are removed on exit, also when the body raises:

        with steer(model, transport, strength=1.0) as steering:
            model(**inputs)
            steering.strength = 0.5   # takes effect on the next forward

    Args:
        model: the torch module whose submodules the transport names.
        transport: the fitted maps.
        strength: 0 leaves outputs bit-identical, 1 applies the full map, values above 1
            extrapolate, negative values apply the inverse map with |strength|.
        active: optional predicate checked on every call; when it returns False the hooks do
            nothing (used for step ranges in diffusion sampling).
        rows: optional function batch_size -> row slices to steer (None: all rows), e.g. only
            the conditional half of a classifier-free-guidance batch.

    Raises:
        ModelMismatchError: a module is missing or has other parameter shapes; no hook is left.
    """
    return Steering(model, transport, strength, active=active, rows=rows)
