"""Pooled source/target samples: what collection produces and fitting consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ActError
from .fitting import fit_transport
from .recording import MEAN, Pooling, Selector
from .transport import Transport

LABELS = ("source", "target")


@dataclass
class Batch:
    """One forward pass of a collection.

    Attributes:
        run: runs the model on this batch (the return value is ignored).
        label: "source" or "target".
        attention_mask: (B, T) mask of real tokens for token outputs, if padded.
        rows: the rows of the batch to record (e.g. the conditional half of a CFG batch).
        select: instead of `attention_mask` and `rows`, decides per site and call which rows
            to pool with which mask, or skips the call (see `act.recording.pooled_sample`).
    """

    run: Callable[[], Any]
    label: str
    attention_mask: torch.Tensor | None = None
    rows: slice | None = None
    select: Selector | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ActError(f"batch label must be 'source' or 'target', got {self.label!r}")


@dataclass
class Samples:
    """Pooled samples per site, (N, D) float32 each, plus where they came from.

    Attributes:
        source / target: {site: samples}, sites in the order the modules run.
        model_class / module_params: the model's class name and fingerprint (see Transport).
        causal: (method, support) of the maps applied while collecting causally, else None.
        info: free-form fields carried into the transport (prompts, description, ...).
        pooling: how token outputs became samples; with per-token pooling the sample counts
            differ from module to module.
    """

    source: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    model_class: str | None = None
    module_params: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    causal: tuple[str, str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    fitted: Transport | None = field(default=None, repr=False)
    pooling: Pooling = MEAN

    @property
    def sites(self) -> list[str]:
        """Sites in order."""
        return list(self.source)

    def summary(self) -> str:
        """One line: modules, units, sample counts."""
        units = sum(t.shape[1] for t in self.source.values())
        kind = f", collected causally ({self.causal[0]}, {self.causal[1]})" if self.causal else ""
        return (
            f"{len(self.source)} modules, {units} units, "
            f"{_count(self.source)} source + {_count(self.target)} target samples"
            f"{' (per token)' if self.pooling.per_token else ''}{kind}"
        )

    def repeat_each(self, sites: list[str], times: int) -> None:
        """Repeat every sample of `sites` `times` times in a row, on both sides.

        With several recorded denoising steps, a text encoder gives one sample per prompt
        while the denoiser gives one per (prompt, step); the fit needs equal counts, and a
        repeated sample leaves a module's empirical distribution, hence its map, unchanged.
        **Mutates** these samples.
        """
        for side in (self.source, self.target):
            for site in sites:
                side[site] = side[site].repeat_interleave(times, dim=0)

    def fit(
        self,
        method: str = "linear",
        support: str = "range",
        progress: Callable[[int, int], None] | None = None,
    ) -> Transport:
        """Fit a transport on these samples, carrying the model fingerprint and info.

        Causally collected samples must be fitted with the method and support used while
        collecting (each module's samples depend on the earlier maps).
        """
        if self.causal is not None and (method, support) != self.causal:
            raise ActError(
                f"these samples were collected causally with method {self.causal[0]!r} and "
                f"support {self.causal[1]!r}; fit them with the same settings, or collect "
                "again with the new ones"
            )
        if self.fitted is not None:
            return self.fitted
        transport = fit_transport(
            self.source,
            self.target,
            method,
            support,
            progress=progress,
            per_prompt=not self.pooling.per_token,
        )
        transport.model_class = self.model_class
        transport.module_params = dict(self.module_params)
        transport.causal = self.causal is not None
        transport.info = dict(self.info)
        return transport


def _count(side: dict[str, torch.Tensor]) -> str:
    """The samples per module: one number, or the range when modules differ (per token)."""
    counts = {len(values) for values in side.values()}
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}–{high}"
