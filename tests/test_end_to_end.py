"""End-to-end fitting (`act.end_to_end`): a known answer, exactness of what it returns, and a
model left exactly as it was."""

import math

import pytest
import torch
from helpers import ConvNet, Stack
from torch import nn

from act import ActError, Batch, EndToEnd, Transport, bake, collect, fit_end_to_end, steer
from act.errors import ModulesNeverRanError
from act.recording import Pooling, record
from act.wasserstein import wasserstein_loss

WIDTH = 4
SCALES = torch.tensor([1.0, 2.0, 0.5, 1.5])  # the first layer's diagonal weight
TARGET_SPREAD = torch.tensor([0.5, 1.0, 2.0, 0.8])
TARGET_MEAN = torch.tensor([1.0, -1.0, 0.5, 0.0])


class TwoLayers(nn.Module):
    """tanh(mix(first(x))): `first` scales each unit, `mix` rotates them.

    Source inputs are N(0, 1) samples per unit, target inputs the same samples times spread
    plus mean, shuffled: the exact transport at `first` is the per-unit affine map
    omega = spread, beta = scale * mean, after which `mix` already sees the target
    distribution, so its exact map is the identity (and the loss 0).
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        generator = torch.Generator().manual_seed(0)
        rotation, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator))
        with torch.no_grad():
            self.first.weight.copy_(torch.diag(SCALES))
            self.first.bias.zero_()
            self.mix.weight.copy_(rotation)
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.first(x)))


SITES = ["first", "mix"]


def two_gaussians(count: int = 256, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(count, WIDTH, generator=generator)
    target = source * TARGET_SPREAD + TARGET_MEAN
    return source, target[torch.randperm(count, generator=generator)]


def batches_of(model: nn.Module, source: torch.Tensor, target: torch.Tensor, parts: int = 1):
    return [Batch(lambda x=x: model(x), "source") for x in source.chunk(parts)] + [
        Batch(lambda: model(target), "target")
    ]


@pytest.fixture
def setting():
    model = TwoLayers().eval()
    source, target = two_gaussians()
    return model, source, target, batches_of(model, source, target)


def steered_loss(model, transport, source, target, sites=SITES) -> float:
    """The loss of the model steered by `transport`, recomputed from scratch."""
    with torch.no_grad(), record(model, sites) as plain:
        model(target)
    with torch.no_grad(), steer(model, transport), record(model, sites) as steered:
        model(source)
    return float(wasserstein_loss(steered.samples(), plain.samples()))


def fit(model, batches, support="all", **settings):
    return fit_end_to_end(model, SITES, batches, EndToEnd(**settings), support=support)


def test_the_joint_fit_beats_independent_linear_act_and_recovers_the_exact_map(setting):
    model, source, target, batches = setting
    linear = collect(model, SITES, batches).fit("linear", "all")
    joint = fit(model, batches, steps=200, learning_rate=0.05)
    linear_loss = steered_loss(model, linear, source, target)
    joint_loss = steered_loss(model, joint, source, target)
    assert linear_loss > 0.5 and joint_loss < 1e-6
    first, mix = joint.maps["first"], joint.maps["mix"]
    assert torch.allclose(first.omega, TARGET_SPREAD, atol=1e-3)
    assert torch.allclose(first.beta, SCALES * TARGET_MEAN, atol=1e-3)
    assert torch.allclose(mix.omega, torch.ones(WIDTH), atol=1e-3)
    assert torch.allclose(mix.beta, torch.zeros(WIDTH), atol=1e-3)
    assert linear.maps["mix"].beta.abs().max() > 0.5  # independent maps move `mix` twice


def test_the_transport_reproduces_the_final_evaluation_with_a_bounded_support():
    model = Stack(width=6, depth=3).eval()
    sites = [f"blocks.{i}" for i in range(3)]
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(2, 8, 5, 4, generator=generator)
    target = torch.randn(2, 8, 5, 4, generator=generator) * 0.7 + 0.4
    mask = torch.ones(8, 5)
    mask[:, :2] = 0  # left padding is never a sample
    batches = [Batch(lambda x=x: model(x), "source", mask) for x in source]
    batches.append(Batch(lambda: model(target.flatten(0, 1)), "target", mask.repeat(2, 1)))
    for pooling in ("mean", "tokens"):
        transport = fit_end_to_end(
            model,
            sites,
            batches,
            EndToEnd(steps=20, learning_rate=0.05, init="linear"),
            pooling=pooling,
        )
        rule = Pooling(pooling)
        with torch.no_grad(), record(model, sites, rule) as plain:
            plain.attention_mask = mask.repeat(2, 1)
            model(target.flatten(0, 1))
        with torch.no_grad(), steer(model, transport), record(model, sites, rule) as steered:
            steered.attention_mask = mask.repeat(2, 1)
            model(source.flatten(0, 1))
        loss = float(wasserstein_loss(steered.samples(), plain.samples()))
        losses = transport.info["end-to-end"]["loss"]
        assert math.isclose(loss, losses["fitted"], rel_tol=1e-5)
        assert losses["fitted"] < losses["start"] < losses["plain"]
        assert all(math.isfinite(float(m.source_lo.max())) for m in transport.maps.values())


def test_channel_maps_train_through_their_spatial_means():
    model = ConvNet().eval()
    generator = torch.Generator().manual_seed(3)
    source = torch.randn(16, 3, 5, 5, generator=generator)
    target = torch.randn(16, 3, 5, 5, generator=generator) * 1.5 + 0.5
    batches = [Batch(lambda: model(source), "source"), Batch(lambda: model(target), "target")]
    sites = ["conv_in", "norm"]
    transport = fit_end_to_end(model, sites, batches, EndToEnd(steps=15), support="all")
    assert math.isclose(
        steered_loss(model, transport, source, target, sites),
        transport.info["end-to-end"]["loss"]["fitted"],
        rel_tol=1e-5,
    )


def test_strength_zero_is_bit_identical(setting):
    model, source, _, batches = setting
    transport = fit(model, batches, steps=5)
    with torch.no_grad():
        plain = model(source)
        with steer(model, transport, 0.0):
            assert torch.equal(model(source), plain)


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_only_the_maps_train_and_the_model_is_left_as_it_was(setting):
    model, _, _, batches = setting
    model.mix.bias.requires_grad_(False)
    before = _state(model)
    fit(model, batches, steps=5)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert all(p.grad is None for p in model.parameters())
    assert not any(module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_fit_returns_nothing_and_leaves_the_model_untouched(setting, stop):
    model, source, _, batches = setting
    before = _state(model)
    with torch.no_grad():
        plain = model(source)

    def progress(step, steps, loss):
        assert steps == 10 and math.isfinite(loss)
        if step == 3:
            raise stop

    with pytest.raises(stop):
        fit_end_to_end(model, SITES, batches, EndToEnd(steps=10), progress=progress)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(module._forward_hooks for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(source), plain)


def test_sparsity_switches_units_off_exactly_and_more_with_a_larger_penalty(setting):
    model, _, _, batches = setting
    off = []
    for sparsity in (0.0, 0.3, 3.0):
        transport = fit(model, batches, steps=60, learning_rate=0.03, sparsity=sparsity)
        identity = [
            (m.omega == 1) & (m.beta == 0) for m in transport.maps.values()
        ]  # exactly, not nearly
        off.append(int(sum(int(units.sum()) for units in identity)))
    assert off[0] == 0 and 0 < off[1] < off[2]


def test_a_seed_makes_minibatched_fits_repeatable(setting):
    model, source, target, _ = setting
    batches = batches_of(model, source, target, parts=4)

    def omegas(seed):
        transport = fit(model, batches, steps=8, batches_per_step=1, seed=seed)
        return torch.cat([m.omega for m in transport.maps.values()])

    assert torch.equal(omegas(5), omegas(5))
    assert not torch.equal(omegas(5), omegas(6))


def test_the_transport_round_trips_through_a_file(setting, tmp_path):
    model, source, _, batches = setting
    transport = fit(model, batches, support="range", steps=5, sparsity=0.1)
    transport.save(tmp_path / "joint.safetensors")
    loaded = Transport.load(tmp_path / "joint.safetensors")
    assert loaded.method == "end-to-end" and loaded.support == "range"
    assert loaded.info["end-to-end"]["steps"] == 5
    assert loaded.model_class == "TwoLayers" and loaded.source_samples == 256
    for site in SITES:
        for name in ("omega", "beta", "source_lo", "source_hi", "target_lo", "target_hi"):
            assert torch.equal(
                getattr(loaded.maps[site], name), getattr(transport.maps[site], name)
            )
    with torch.no_grad(), steer(model, loaded):
        assert torch.isfinite(model(source)).all()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"learning_rate": 0}, "learning_rate must be a positive number, got 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number, got nan"),
        ({"sparsity": -1}, "sparsity must be a number >= 0 (0: none), got -1"),
        ({"sparsity": True}, "sparsity must be a number >= 0 (0: none), got True"),
        ({"init": "zero"}, "unknown init 'zero'; choose one of identity, linear"),
        ({"batches_per_step": 0}, "batches_per_step must be at least 1, got 0"),
        ({"seed": "one"}, "seed must be a whole number, got 'one'"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ActError) as raised:
        EndToEnd(**settings)
    assert str(raised.value) == message


def test_bad_inputs_are_reported(setting):
    model, source, _, batches = setting
    with pytest.raises(ActError, match="needs source and target batches; got only"):
        fit_end_to_end(model, SITES, batches[:1])
    with pytest.raises(ActError, match="no batches to collect from"):
        fit_end_to_end(model, SITES, [])
    with pytest.raises(ActError, match="unknown support 'q70'"):
        fit_end_to_end(model, SITES, batches, support="q70")
    with pytest.raises(ActError, match=r"use act\.fit_end_to_end"):
        collect(model, SITES, batches, method="end-to-end", causal=True)

    def without_gradients():
        with torch.no_grad():
            model(source)

    frozen = [Batch(without_gradients, "source"), batches[-1]]
    with pytest.raises(ActError, match="ran without autograd"):
        fit_end_to_end(model, SITES, frozen)
    assert all(p.requires_grad for p in model.parameters())


def test_a_site_the_source_never_reaches_is_reported(setting):
    model, source, target, _ = setting
    calls = {"source": 0}

    def only_first():
        calls["source"] += 1
        if calls["source"] == 1:
            return model(source)  # the plain collection runs both layers
        return model.first(source)

    batches = [Batch(only_first, "source"), Batch(lambda: model(target), "target")]
    with pytest.raises(ModulesNeverRanError, match=r"\['mix'\] never ran"):
        fit_end_to_end(model, SITES, batches, EndToEnd(steps=2))


class ShiftedLog(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x + 3)


def test_a_loss_that_becomes_nan_is_reported():
    model = nn.Sequential(nn.Identity(), ShiftedLog()).eval()
    source, target = torch.rand(32, 3) + 1, -torch.rand(32, 3) - 1
    batches = [Batch(lambda: model(source), "source"), Batch(lambda: model(target), "target")]
    with pytest.raises(ActError, match=r"the end-to-end loss became nan at step \d"):
        fit_end_to_end(model, ["0", "1"], batches, EndToEnd(learning_rate=100), support="all")


def test_the_loss_is_the_scaled_squared_wasserstein_distance_per_unit():
    generator = torch.Generator().manual_seed(4)
    target = torch.randn(50, 3, generator=generator) * torch.tensor([1.0, 2.0, 3.0])
    shuffled = target[torch.randperm(50, generator=generator)]
    variance = float(target.double().var(dim=0, unbiased=False).mean())
    assert float(wasserstein_loss({"a": shuffled}, {"a": target})) == 0
    shifted = float(
        wasserstein_loss({"a": shuffled + 0.5, "b": target}, {"a": target, "b": target})
    )
    assert math.isclose(shifted, 0.25 / variance, rel_tol=1e-6)
    fewer = torch.tensor([[0.0], [1.0]])  # quantiles at 1/6, 1/2, 5/6: 0, 0.5, 1
    assert float(wasserstein_loss({"a": fewer}, {"a": torch.tensor([[0.0], [0.5], [1.0]])})) == 0


def test_baking_folds_the_fitted_maps_like_steering(setting):
    model, source, _, batches = setting
    transport = fit(model, batches, steps=10)
    with torch.no_grad():
        with steer(model, transport):
            steered = model(source)
        with bake(model, transport):
            torch.testing.assert_close(model(source), steered, atol=1e-5, rtol=1e-5)
