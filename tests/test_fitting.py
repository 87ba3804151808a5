"""Closed-form checks of the estimators."""

import numpy as np
import pytest
import torch

from act import ActError, fit_transport


def _fit(source, target, **kwargs):
    return fit_transport({"m": source}, {"m": target}, **kwargs).maps["m"]


def test_recovers_exact_affine_map_from_permuted_targets():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(64, 10)).astype(np.float32)
    omega = rng.uniform(0.2, 3.0, size=10)
    beta = rng.uniform(-2, 2, size=10)
    target = (source * omega + beta).astype(np.float32)
    target = target[rng.permutation(64)]  # the pairing must come from sorting, not row order
    fitted = _fit(source, target, support="all")
    np.testing.assert_allclose(fitted.omega.numpy(), omega, rtol=1e-5)
    np.testing.assert_allclose(fitted.beta.numpy(), beta, atol=1e-5)


def test_agrees_with_direct_float64_least_squares_on_sorted_pairs():
    rng = np.random.default_rng(1)
    source = rng.gamma(2.0, size=(200, 7)).astype(np.float32)
    target = rng.normal(3.0, 0.5, size=(200, 7)).astype(np.float32)
    fitted = _fit(torch.from_numpy(source), torch.from_numpy(target))
    for unit in range(7):
        a = np.sort(source[:, unit]).astype(np.float64)
        b = np.sort(target[:, unit]).astype(np.float64)
        slope, intercept = np.polyfit(a, b, 1)
        assert fitted.omega[unit].item() == pytest.approx(slope, rel=1e-5)
        assert fitted.beta[unit].item() == pytest.approx(intercept, rel=1e-5, abs=1e-5)


def test_maps_source_mean_to_target_mean():
    rng = np.random.default_rng(2)
    source = rng.exponential(size=(100, 5))
    target = rng.normal(-1.0, 2.0, size=(100, 5))
    fitted = _fit(source, target)
    mapped = fitted.omega.double() * torch.from_numpy(source.mean(0)) + fitted.beta.double()
    np.testing.assert_allclose(mapped.numpy(), target.mean(0), atol=1e-5)
    assert (fitted.omega >= 0).all()


def test_gaussians_give_the_ratio_of_deviations():
    rng = np.random.default_rng(3)
    source = rng.normal(1.0, 2.0, size=(4000, 3))
    target = rng.normal(-2.0, 0.5, size=(4000, 3))
    linear = _fit(source, target, support="all")
    np.testing.assert_allclose(linear.omega.numpy(), 0.25, rtol=0.05)
    np.testing.assert_allclose(linear.beta.numpy(), -2.0 - 0.25 * 1.0, atol=0.1)
    gaussian = _fit(source, target, method="gaussian", support="all")
    np.testing.assert_allclose(gaussian.omega.numpy(), target.std(0) / source.std(0), rtol=1e-5)
    mean = _fit(source, target, method="mean", support="all")
    assert torch.equal(mean.omega, torch.ones(3))
    np.testing.assert_allclose(mean.beta.numpy(), target.mean(0) - source.mean(0), atol=1e-5)


def test_unequal_counts_match_quantiles_on_a_common_grid():
    rng = np.random.default_rng(4)
    source = rng.normal(size=(90, 4)).astype(np.float32)
    target = rng.normal(2.0, 3.0, size=(150, 4)).astype(np.float32)
    fitted = _fit(source, target)
    n = 150
    levels = (np.arange(n) + 0.5) / n
    for unit in range(4):
        a = np.sort(source[:, unit]).astype(np.float64)
        grid_a = np.interp(levels, (np.arange(90) + 0.5) / 90, a)
        b = np.sort(target[:, unit]).astype(np.float64)
        slope, intercept = np.polyfit(grid_a, b, 1)
        assert fitted.omega[unit].item() == pytest.approx(slope, rel=1e-5)
        assert fitted.beta[unit].item() == pytest.approx(intercept, rel=1e-4, abs=1e-5)
    transport = fit_transport({"m": source}, {"m": target})
    assert (transport.source_samples, transport.target_samples) == (90, 150)


def test_constant_source_unit_becomes_a_shift():
    source = np.ones((20, 2), dtype=np.float32)
    source[:, 1] = np.linspace(0, 1, 20)
    target = np.linspace(5, 7, 20, dtype=np.float32)[:, None].repeat(2, axis=1)
    fitted = _fit(source, target)
    assert fitted.omega[0].item() == 1.0
    assert fitted.beta[0].item() == pytest.approx(6.0 - 1.0)
    assert np.isfinite(fitted.omega.numpy()).all()


def test_supports_bound_where_the_map_applies():
    rng = np.random.default_rng(5)
    source = rng.normal(size=(101, 3)).astype(np.float32)
    target = rng.normal(4, 1, size=(101, 3)).astype(np.float32)
    ranged = _fit(source, target, support="range")
    np.testing.assert_array_equal(ranged.source_lo.numpy(), source.min(0))
    np.testing.assert_array_equal(ranged.source_hi.numpy(), source.max(0))
    np.testing.assert_array_equal(ranged.target_hi.numpy(), target.max(0))
    quantile = _fit(source, target, support="q05")
    np.testing.assert_allclose(quantile.source_lo.numpy(), np.quantile(source, 0.05, 0), rtol=1e-6)
    np.testing.assert_allclose(quantile.source_hi.numpy(), np.quantile(source, 0.95, 0), rtol=1e-6)
    unbounded = _fit(source, target, support="all")
    assert torch.isinf(unbounded.source_lo).all() and (unbounded.source_lo < 0).all()
    mean_range = _fit(source, target, method="mean", support="range")
    np.testing.assert_array_equal(mean_range.target_lo.numpy(), target.min(0))


@pytest.mark.parametrize(
    ("source", "target", "kwargs", "message"),
    [
        (np.full((4, 2), np.nan), np.zeros((4, 2)), {}, "NaN or infinite"),
        (np.zeros((4, 2)), np.zeros((4, 3)), {}, "3"),
        (np.zeros((4,)), np.zeros((4,)), {}, "shape (N, D)"),
        (np.zeros((1, 2)), np.zeros((4, 2)), {}, "at least 2"),
        (np.zeros((4, 2)), np.zeros((4, 2)), {"method": "cubic"}, "unknown method 'cubic'"),
        (np.zeros((4, 2)), np.zeros((4, 2)), {"support": "q75"}, "unknown support 'q75'"),
    ],
)
def test_bad_samples_are_rejected_with_the_offending_value(source, target, kwargs, message):
    with pytest.raises(ActError) as raised:
        fit_transport({"module.a": source}, {"module.a": target}, **kwargs)
    assert message in str(raised.value)
    if not kwargs:
        assert "module.a" in str(raised.value)


def test_mismatched_module_sets_and_counts_are_rejected():
    a = np.zeros((4, 2))
    with pytest.raises(ActError, match="different modules"):
        fit_transport({"x": a}, {"y": a})
    with pytest.raises(ActError, match="empty"):
        fit_transport({}, {})
    with pytest.raises(ActError, match="sample counts"):
        fit_transport({"x": a, "y": np.zeros((5, 2))}, {"x": a, "y": np.zeros((5, 2))})


def test_progress_is_reported_per_module():
    a = np.random.default_rng(0).normal(size=(8, 2))
    seen = []
    fit_transport({"x": a, "y": a}, {"x": a, "y": a}, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
