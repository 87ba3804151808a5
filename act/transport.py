"""The transport: per-unit affine maps T(a) = omega * a + beta for a set of module outputs.

A `Transport` is pure data (float32 tensors plus metadata). Fitting lives in `act.fitting`,
files in `act.io`, and applying it to a model in `act.steering` / `act.baking`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ActError

METHODS = ("linear", "mean", "gaussian")


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

    @property
    def units(self) -> int:
        """Number of units (the width D of the module output)."""
        return self.omega.shape[0]

    def coefficients(self, strength: float) -> Coefficients:
        """Affine coefficients of the map at a given strength, computed in float64.

        strength >= 0: `T_s(a) = a + s(T(a) - a)` on the source support.
        strength < 0: the inverse map `(a - beta) / omega` interpolated with |s| on the target
        support. Units with omega == 0 have no inverse and are left unchanged.
        """
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
        return Coefficients(scale.float(), shift.float(), lo.clone(), hi.clone())

    def apply(self, values: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """Reference (out-of-place) application to values of shape (..., units)."""
        c = self.coefficients(strength).to(values.device)
        moved = (values.float() * c.scale + c.shift).to(values.dtype)
        inside = (values > c.lo) & (values < c.hi)
        return torch.where(inside, moved, values)


@dataclass
class Transport:
    """Ordered per-module maps plus the metadata a transport file carries.

    Attributes:
        maps: module site (`name` or `name:index` for tuple outputs) -> ModuleMap, in the order
            the modules run.
        method: estimator used to fit the maps ("linear", "mean" or "gaussian").
        support: support rule ("range", "all" or a central quantile range "qNN").
        source_samples / target_samples: number of samples each map was fitted on.
        model_class: class name of the model the samples came from, if known.
        module_params: per site, the shapes of the module's own parameters (a fingerprint used
            to reject a model of another architecture); empty when unknown.
        causal: whether the maps were estimated causally (each on the previous maps' output).
        default_strength: strength suggested to users of the file.
        info: free-form JSON-serialisable fields (prompts, description, ...).
    """

    maps: dict[str, ModuleMap]
    method: str
    support: str
    source_samples: int
    target_samples: int
    model_class: str | None = None
    module_params: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    causal: bool = False
    default_strength: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ActError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.maps:
            raise ActError("a transport needs at least one module map")
        if not math.isfinite(self.default_strength):
            raise ActError(
                f"default_strength must be a finite number, got {self.default_strength!r}"
            )

    @property
    def sites(self) -> list[str]:
        """Module sites in application order."""
        return list(self.maps)

    @property
    def units(self) -> int:
        """Total number of transported units over all modules."""
        return sum(m.units for m in self.maps.values())

    def moved_fraction(self, tolerance: float = 1e-3) -> float:
        """Fraction of units whose map differs from the identity by more than `tolerance`."""
        moved = sum(
            int(((m.omega - 1).abs().gt(tolerance) | m.beta.abs().gt(tolerance)).sum())
            for m in self.maps.values()
        )
        return moved / self.units

    def summary(self) -> str:
        """A few human-readable lines: modules, units, method, support, samples."""
        lines = [
            f"{len(self.maps)} modules, {self.units} units, method {self.method}, "
            f"support {self.support}{', causal' if self.causal else ''}",
            f"fitted on {self.source_samples} source + {self.target_samples} target samples"
            + (f" of {self.model_class}" if self.model_class else ""),
            f"{self.moved_fraction():.0%} of units moved",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        sites = self.sites
        shown = ", ".join(sites[:3]) + (f", ... (+{len(sites) - 3})" if len(sites) > 3 else "")
        return (
            f"Transport(method={self.method!r}, support={self.support!r}, modules={len(sites)}, "
            f"units={self.units}, samples={self.source_samples}+{self.target_samples}, "
            f"sites=[{shown}])"
        )

    def subset(self, sites: list[str]) -> Transport:
        """The same transport restricted to `sites` (in that order)."""
        unknown = [site for site in sites if site not in self.maps]
        if unknown:
            raise ActError(f"sites not in this transport: {unknown}")
        return replace(
            self,
            maps={site: self.maps[site] for site in sites},
            module_params={s: self.module_params[s] for s in sites if s in self.module_params},
        )

    def component(self, prefix: str) -> Transport | None:
        """The maps of sites under `prefix.`, renamed without the prefix (None if there are none).

        Transports fitted on several components at once (e.g. `unet.*` and `text_encoder.*`)
        are applied one component at a time with this.
        """
        start = f"{prefix}."
        maps = {site[len(start) :]: m for site, m in self.maps.items() if site.startswith(start)}
        if not maps:
            return None
        params = {
            site[len(start) :]: shapes
            for site, shapes in self.module_params.items()
            if site.startswith(start)
        }
        return replace(self, maps=maps, module_params=params)

    def save(self, path: str | Path) -> None:
        """Write the transport as a safetensors file with a JSON header."""
        from .io import save_transport

        save_transport(self, path)

    @classmethod
    def load(cls, path: str | Path) -> Transport:
        """Read and validate a transport file written by `save`."""
        from .io import load_transport

        return load_transport(path)
