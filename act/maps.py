"""Per-unit affine maps `T(a) = omega * a + beta`, the estimators that fit them, and where
they apply (the support).

The vocabulary every other module shares: `ModuleMap` (one module output's maps, float32
tensors), `Coefficients` (a map at one strength, ready to apply), `Support` (the rule that
bounds where a map applies), `METHODS` (the estimators that fit maps from samples) and
`TRANSPORT_METHODS` (those plus "end-to-end", which fits them through the model). Fitting lives
in `act.fitting` and `act.end_to_end`, the transport of several modules in `act.transport`.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ActError

METHODS = ("linear", "mean", "gaussian")
END_TO_END = "end-to-end"
TRANSPORT_METHODS = (*METHODS, END_TO_END)
# A map must stay finite in float32 (the dtype maps are applied in) on every activation a
# float16 model can produce: |scale| * FLOAT16_MAX + |shift| <= FLOAT32_MAX.
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_QUANTILE_SUPPORT = re.compile(r"q(\d+(?:\.\d+)?)")


def checked_strength(value: object) -> float:
    """`value` as a float if it is a finite real number; else an ActError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ActError(f"strength must be a number, got {value!r}")
    strength = float(value)
    if not math.isfinite(strength):
        raise ActError(f"strength must be finite, got {value!r}")
    return strength


@dataclass(frozen=True)
class Support:
    """Where a map applies: between the `level` and `1 - level` quantiles of the samples.

    level 0 is the sample range [min, max]; `None` means unbounded (transport everywhere).
    """

    level: float | None

    @classmethod
    def parse(cls, support: str) -> Support:
        """Parse "range", "all" or "qNN" (central quantile range [NN%, 100-NN%], 0 < NN < 50)."""
        if support == "range":
            return cls(0.0)
        if support == "all":
            return cls(None)
        match = _QUANTILE_SUPPORT.fullmatch(support) if isinstance(support, str) else None
        if match and 0 < float(match.group(1)) < 50:
            return cls(float(match.group(1)) / 100)
        raise ActError(
            f"unknown support {support!r}; use 'range' (source min..max), 'all' (no bound) "
            "or 'qNN' for the central quantile range [NN%, 100-NN%], e.g. 'q01' or 'q05'"
        )

    def bounds(self, sorted_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bound per row of an array whose rows are sorted ascending."""
        units = sorted_rows.shape[0]
        if self.level is None:
            return np.full(units, -np.inf), np.full(units, np.inf)
        return _row_quantile(sorted_rows, self.level), _row_quantile(sorted_rows, 1 - self.level)


def _row_quantile(sorted_rows: np.ndarray, level: float) -> np.ndarray:
    """Quantile at `level` of each sorted row, interpolating linearly (numpy's default rule)."""
    position = level * (sorted_rows.shape[1] - 1)
    lower = int(np.floor(position))
    upper = min(lower + 1, sorted_rows.shape[1] - 1)
    weight = position - lower
    low = sorted_rows[:, lower].astype(np.float64)
    return low + weight * (sorted_rows[:, upper].astype(np.float64) - low)


@dataclass(frozen=True)
class Coefficients:
    """`a -> scale * a + shift` where `lo < a < hi`; float32 tensors of shape (D,).

    `scale_minus_one` (so that `T_s(a) - a = (scale - 1) * a + shift`) and `bounded` (whether
    any unit has a finite bound, so a comparison is needed) are derived once.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    scale_minus_one: torch.Tensor = field(init=False, repr=False)
    bounded: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_minus_one", self.scale - 1)
        finite = torch.isfinite(self.lo).any() | torch.isfinite(self.hi).any()
        object.__setattr__(self, "bounded", bool(finite))

    def to(self, device: torch.device | str) -> Coefficients:
        """The same coefficients on another device."""
        return Coefficients(*(t.to(device) for t in (self.scale, self.shift, self.lo, self.hi)))


@dataclass(frozen=True)
class ModuleMap:
    """Per-unit map of one module output: `T(a) = omega * a + beta`.

    `source_lo`/`source_hi` bound where the forward map applies (the support, taken from the
    source samples); `target_lo`/`target_hi` bound where the inverse map applies. Unbounded
    supports hold -inf/+inf. All tensors are float32 of shape (units,).
    """

    omega: torch.Tensor
    beta: torch.Tensor
    source_lo: torch.Tensor
    source_hi: torch.Tensor
    target_lo: torch.Tensor
    target_hi: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.omega.shape
        for name in ("beta", "source_lo", "source_hi", "target_lo", "target_hi"):
            tensor = getattr(self, name)
            if tensor.shape != shape or tensor.ndim != 1:
                raise ActError(
                    f"ModuleMap.{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
                )
        if self.omega.ndim != 1 or self.units < 1:
            raise ActError(f"a module map needs at least one unit, got shape {tuple(shape)}")
        for name in ("omega", "beta"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ActError(f"ModuleMap.{name} contains NaN or infinite values")
        for name in ("source_lo", "source_hi", "target_lo", "target_hi"):
            if torch.isnan(getattr(self, name)).any():
                raise ActError(f"ModuleMap.{name} contains NaN")
        self.coefficients(1.0)  # the full map itself must stay finite in float32

    @property
    def units(self) -> int:
        """Number of units (the width D of the module output)."""
        return self.omega.shape[0]

    def coefficients(self, strength: float) -> Coefficients:
        """Affine coefficients of the map at a given strength, computed in float64.

        strength >= 0: `T_s(a) = a + s(T(a) - a)` on the source support.
        strength < 0: the inverse map `(a - beta) / omega` interpolated with |s| on the target
        support. Units with omega == 0 have no inverse and are left unchanged.

        Raises:
            ActError: the strength is not a finite number, or the map at that strength would
                overflow float32 on activations of float16 range (|a| up to 65504).
        """
        strength = checked_strength(strength)
        omega = self.omega.double()
        beta = self.beta.double()
        if strength >= 0:
            scale = 1 + strength * (omega - 1)
            shift = strength * beta
            lo, hi = self.source_lo, self.source_hi
        else:
            amount = -strength
            invertible = omega != 0
            safe_omega = torch.where(invertible, omega, torch.ones_like(omega))
            inverse_scale = torch.where(invertible, 1 / safe_omega, torch.ones_like(omega))
            inverse_shift = torch.where(invertible, -beta / safe_omega, torch.zeros_like(beta))
            scale = 1 + amount * (inverse_scale - 1)
            shift = amount * inverse_shift
            lo, hi = self.target_lo, self.target_hi
        reach = float((scale.abs() * FLOAT16_MAX + shift.abs()).max())
        if not reach <= FLOAT32_MAX:
            largest = float(scale.abs().max())
            raise ActError(
                f"at strength {strength:g} the map scales activations by up to {largest:.3g} "
                f"and shifts them by up to {float(shift.abs().max()):.3g}: it overflows float32 "
                "on activations of float16 range; use a strength nearer 0 or refit the map"
            )
        return Coefficients(scale.float(), shift.float(), lo.clone(), hi.clone())

    def apply(self, values: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """Reference (out-of-place) application to values of shape (..., units)."""
        c = self.coefficients(strength).to(values.device)
        moved = (values.float() * c.scale + c.shift).to(values.dtype)
        inside = (values > c.lo) & (values < c.hi)
        return torch.where(inside, moved, values)
