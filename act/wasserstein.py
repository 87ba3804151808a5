"""The loss of end-to-end fitting: 1-D Wasserstein-2 distances per unit, summed over sites.

Per site, the squared W2 distance between the source and target samples of every unit (sort
both; with unequal counts, both empirical quantile functions on a common grid of max(N, M)
levels at the midpoints (i + 0.5) / n, as in `act.fitting`), averaged over units and divided by
s^2, the mean over units of the target variance: every site counts alike whatever the size of
its activations. The loss is the sum over sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def wasserstein_loss(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The end-to-end loss of source samples against target samples ({site: (N, D)} each).

    Per site: mean over units of W2^2(source unit, target unit) / s^2, s^2 the mean over units
    of the target variance; summed over the sites. Differentiable in `source`.
    """
    total = torch.zeros((), dtype=torch.float64)
    for site, samples in source.items():
        reference = SiteTarget(target[site])
        total = total + reference.loss(samples)
    return total


class SiteTarget:
    """One site's target samples, sorted once, and its scale s."""

    def __init__(self, target: torch.Tensor) -> None:
        self.sorted = target.double().sort(dim=0).values
        variance = float(target.double().var(dim=0, unbiased=False).mean())
        self.scale = math.sqrt(variance) if variance > 0 else 1.0

    def loss(self, samples: torch.Tensor) -> torch.Tensor:
        """Mean over units of the squared W2 distance to the target, divided by s^2."""
        ordered = samples.double().sort(dim=0).values
        count = max(len(ordered), len(self.sorted))
        gap = _quantiles(ordered, count) - _quantiles(self.sorted, count)
        return gap.square().mean() / self.scale**2


def _quantiles(ordered: torch.Tensor, count: int) -> torch.Tensor:
    """Columns' empirical quantile functions at levels (i + 0.5) / count (sorted rows when
    count is their number), interpolating linearly between order statistics."""
    rows = ordered.shape[0]
    if rows == count:
        return ordered
    position = ((torch.arange(count, dtype=torch.float64) + 0.5) * rows / count - 0.5).clamp(
        0, rows - 1
    )
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=rows - 1)
    weight = (position - lower).unsqueeze(1)
    return ordered[lower] * (1 - weight) + ordered[upper] * weight
