"""The transport: the per-unit maps of a set of module outputs, plus the metadata its file
carries.

A `Transport` is data (float32 `ModuleMap`s, see `act.maps`) with its file methods; the file
layout is `act.io`'s, which knows maps and header fields but not this class. Fitting lives in
`act.fitting`, applying it to a model in `act.steering` / `act.baking`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ActError
from .files import read_regular_file, write_atomically
from .io import transport_from_bytes, transport_to_bytes
from .maps import TRANSPORT_METHODS, ModuleMap


@dataclass
class Transport:
    """Ordered per-module maps plus the metadata a transport file carries.

    Attributes:
        maps: module site (`name` or `name:index` for tuple outputs) -> ModuleMap, in the order
            the modules run.
        method: estimator used to fit the maps ("linear", "mean", "gaussian" or "end-to-end").
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
        if self.method not in TRANSPORT_METHODS:
            raise ActError(
                f"unknown method {self.method!r}; choose one of {', '.join(TRANSPORT_METHODS)}"
            )
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

    def to_bytes(self) -> bytes:
        """The bytes of the transport's safetensors file (see `act.io`)."""
        return transport_to_bytes(self.maps, self._header_fields())

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<bytes>") -> Transport:
        """Parse and validate the bytes of a transport file; `name` appears in errors.

        Raises:
            TransportFileError: the bytes are truncated, malformed or inconsistent.
        """
        maps, fields = transport_from_bytes(data, name)
        return cls(maps, **fields)

    def save(self, path: str | os.PathLike) -> None:
        """Write the transport as a safetensors file with a JSON header (atomically)."""
        write_atomically(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Transport:
        """Read and validate a transport file written by `save`.

        Raises:
            TransportFileError: the file is missing, truncated, malformed or inconsistent.
        """
        return cls.from_bytes(read_regular_file(path), str(path))

    def _header_fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "maps"}
