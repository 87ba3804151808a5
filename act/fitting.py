"""Fitting per-unit transport maps from pooled source and target samples.

Linear-AcT (Rodriguez et al., 2024): for every unit independently, sort the source values
a(1..n) and the target values b(1..n) (1-D optimal transport between empirical measures is the
monotone matching), then solve least squares on the sorted pairs in float64:

    omega = sum((a - ma)(b - mb)) / sum((a - ma)^2),   beta = mb - omega * ma.

Unequal sample counts: both empirical quantile functions are evaluated on a common grid of
max(N, M) levels at the midpoints (i + 0.5) / n, interpolating linearly between order
statistics; with equal counts this is exactly "sort both and pair them".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from .errors import ActError
from .hooks import module_fingerprint
from .maps import METHODS, ModuleMap, Support
from .transport import Transport

ArrayLike = torch.Tensor | np.ndarray


def fit_transport(
    source: Mapping[str, ArrayLike],
    target: Mapping[str, ArrayLike],
    method: str = "linear",
    support: str = "range",
    *,
    model: torch.nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
    per_prompt: bool = True,
) -> Transport:
    """Fit one map per module from pooled samples.

    Args:
        source: module site -> samples of shape (N, D) to move away from (tensor or array).
        target: module site -> samples of shape (M, D) to move towards; same sites as source.
            N and M may differ (see the module docstring).
        method: "linear" (Linear-AcT), "mean" (Mean-AcT, omega = 1) or "gaussian"
            (omega = sigma_target / sigma_source).
        support: "range" (transport only where min < a < max of the source samples; the
            paper's choice for mitigation and negation), "all" (no bound; style and induction)
            or "qNN" (between the NN% and (100-NN)% source quantiles).
        model: the model the samples came from; when given, its class name and the shapes of
            the hooked modules' parameters are stored so that a mismatched model is rejected.
        progress: called as `progress(done, total)` after each module.
        per_prompt: every module has one sample per prompt (pooled samples), so all modules
            must have the same counts; False for per-token samples, whose counts differ from
            module to module (the transport then records the fewest of any module).

    Returns:
        A `Transport` with the maps in the order of `source`.
    """
    if method not in METHODS:
        raise ActError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    rule = Support.parse(support)
    if not source:
        raise ActError("no source samples given: the mapping of module -> samples is empty")
    if set(source) != set(target):
        missing = sorted(set(source) ^ set(target))
        raise ActError(f"source and target samples cover different modules: {missing}")
    maps: dict[str, ModuleMap] = {}
    counts: set[tuple[int, int]] = set()
    for done, site in enumerate(source, start=1):
        a = _unit_rows(source[site], site, "source")
        b = _unit_rows(target[site], site, "target")
        if a.shape[0] != b.shape[0]:
            raise ActError(
                f"module {site!r}: source samples have {a.shape[0]} units but target samples "
                f"have {b.shape[0]}; both must come from the same module"
            )
        counts.add((a.shape[1], b.shape[1]))
        try:
            maps[site] = fit_module(a, b, method, rule)
        except ActError as error:
            raise ActError(f"module {site!r}: {error}") from None
        if progress is not None:
            progress(done, len(source))
    if len(counts) > 1 and per_prompt:
        raise ActError(
            f"modules were given different sample counts {sorted(counts)}; every module needs "
            "one sample per prompt (per-token samples: pass per_prompt=False)"
        )
    source_count = min(count for count, _ in counts)
    target_count = min(count for _, count in counts)
    transport = Transport(maps, method, support, source_count, target_count)
    if model is not None:
        transport.model_class = type(model).__name__
        transport.module_params = module_fingerprint(model, list(maps))
    return transport


def fit_module(a: np.ndarray, b: np.ndarray, method: str, support: Support) -> ModuleMap:
    """Fit one module's map from unit-major samples.

    Args:
        a: source samples, float32 of shape (D, N); **sorted in place** when needed.
        b: target samples, float32 of shape (D, M); **sorted in place** when needed.
        method: "linear", "mean" or "gaussian".
        support: the support rule.
    """
    needs_sort = method == "linear" or (support.level is not None and support.level > 0)
    if needs_sort:
        a.sort(axis=1)
        b.sort(axis=1)
    if method == "linear":
        omega, beta = _sorted_least_squares(a, b)
    else:
        mean_a = a.mean(axis=1, dtype=np.float64)
        mean_b = b.mean(axis=1, dtype=np.float64)
        if method == "mean":
            omega = np.ones_like(mean_a)
        else:
            std_a = a.std(axis=1, dtype=np.float64)
            std_b = b.std(axis=1, dtype=np.float64)
            omega = np.where(std_a > 0, std_b / np.where(std_a > 0, std_a, 1.0), 1.0)
        beta = mean_b - omega * mean_a
    if needs_sort:
        source_lo, source_hi = support.bounds(a)
        target_lo, target_hi = support.bounds(b)
    elif support.level is None:
        source_lo, source_hi = target_lo, target_hi = Support(None).bounds(a)
    else:
        source_lo, source_hi = a.min(axis=1), a.max(axis=1)
        target_lo, target_hi = b.min(axis=1), b.max(axis=1)
    return ModuleMap(
        *(
            torch.from_numpy(np.asarray(x, dtype=np.float32))
            for x in (omega, beta, source_lo, source_hi, target_lo, target_hi)
        )
    )


def _sorted_least_squares(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(omega, beta) of the least squares fit b ~ omega * a + beta on sorted rows, in float64.

    Rows with a constant source (zero spread) get omega = 1 (a pure shift of the means).
    """
    n = max(a.shape[1], b.shape[1])
    centred_a = _quantile_grid(a, n)
    centred_b = _quantile_grid(b, n)
    mean_a = centred_a.mean(axis=1)
    mean_b = centred_b.mean(axis=1)
    centred_a -= mean_a[:, None]
    centred_b -= mean_b[:, None]
    cross = np.einsum("ij,ij->i", centred_a, centred_b)
    spread = np.einsum("ij,ij->i", centred_a, centred_a)
    constant = a[:, -1] == a[:, 0]
    omega = np.where(constant, 1.0, cross / np.where(constant, 1.0, spread))
    return omega, mean_b - omega * mean_a


def _quantile_grid(sorted_rows: np.ndarray, n: int) -> np.ndarray:
    """Rows' empirical quantile functions at the levels (i + 0.5) / n, i < n, as float64.

    With n equal to the row length this is the sorted rows themselves.
    """
    m = sorted_rows.shape[1]
    if m == n:
        return sorted_rows.astype(np.float64)
    position = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, m - 1)
    weight = position - lower
    rows = sorted_rows.astype(np.float64)
    return rows[:, lower] * (1 - weight) + rows[:, upper] * weight


def _unit_rows(samples: ArrayLike, site: str, side: str) -> np.ndarray:
    """Samples (N, D) as a new contiguous float32 array of shape (D, N); the input is never
    modified, whatever its memory layout."""
    try:
        if isinstance(samples, torch.Tensor):
            array = samples.detach().to("cpu", torch.float32).numpy()
        else:
            array = np.asarray(samples, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ActError(
            f"module {site!r}: {side} samples must be numbers of shape (N, D) "
            f"({type(samples).__name__} given: {error})"
        ) from None
    if array.ndim != 2:
        raise ActError(
            f"module {site!r}: {side} samples must have shape (N, D), got {tuple(array.shape)}"
        )
    if array.shape[0] < 2:
        raise ActError(
            f"module {site!r}: {array.shape[0]} {side} sample(s); at least 2 are needed to fit"
        )
    if array.shape[1] < 1:
        raise ActError(
            f"module {site!r}: {side} samples have no units (shape {tuple(array.shape)}); "
            "the module's output is empty"
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - finite.sum())
        raise ActError(
            f"module {site!r}: {bad} {side} value(s) are NaN or infinite; check the model's "
            "dtype (fp16 overflow?) and the prompts"
        )
    return np.array(array.T, order="C")  # always a copy: fitting sorts it in place
