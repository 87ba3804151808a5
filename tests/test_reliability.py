"""Regressions: inputs that once corrupted weights or samples, mixed transports across threads,
or ended in a raw exception instead of a clear error."""

import threading

import numpy as np
import pytest
import torch
from helpers import Stack, random_map
from torch import nn

from act import ActError, ModuleMap, Transport, bake, bake_deltas, fit_transport, steer


class PositionTable(nn.Module):
    """Returns a slice of its own parameter, as positional tables do."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4), requires_grad=False)

    def forward(self, length: int) -> torch.Tensor:
        return self.table[:length]


class ReturnsItsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.randn(3, 4))

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.value


class Positions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = PositionTable()
        self.const = ReturnsItsBuffer()

    def forward(self, length: int) -> torch.Tensor:
        return self.pos(length) + self.const(torch.zeros(1)).sum()


def _transport(sites: list[str], units: int = 4) -> Transport:
    maps = {site: random_map(units, seed=i) for i, site in enumerate(sites)}
    return Transport(maps, "linear", "all", 10, 10)


def test_steering_a_view_of_a_parameter_never_writes_into_it():
    model = Positions()
    table, buffer = model.pos.table.clone(), model.const.value.clone()
    plain = model(3)
    with torch.no_grad(), steer(model, _transport(["pos", "const"])):
        first, second = model(3), model(3)
    assert torch.equal(model.pos.table, table) and torch.equal(model.const.value, buffer)
    assert torch.equal(first, second) and not torch.equal(first, plain)
    assert torch.equal(model(3), plain)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize("site", ["first", "second"])
def test_baking_tied_weights_is_refused_naming_both_modules(site):
    model = Tied()
    weights = [p.clone() for p in model.parameters()]
    with pytest.raises(ActError, match=r"shares its parameters with '(first|second)'.*tied"):
        bake(model, _transport([site]))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))


@pytest.mark.parametrize(
    ("strength", "message"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("1", "must be a number"),
        (None, "a number"),
    ],
)
def test_bake_validates_strength_like_steer(strength, message):
    model = Stack()
    transport = _transport(["blocks.0.norm"], units=8)
    weights = [p.clone() for p in model.parameters()]
    for fold in (bake, bake_deltas):
        with pytest.raises(ActError, match=message):
            fold(model, transport, strength)
    with pytest.raises(ActError, match=message):
        steer(model, transport, strength)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights, strict=True))


def test_a_second_thread_cannot_steer_a_module_another_thread_steers():
    model = Stack()
    first, second = _transport(["blocks.0.norm"], 8), _transport(["blocks.0.norm"], 8)
    errors: list[BaseException] = []
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with steer(model, first):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold, name="request-1")
    holder.start()
    entered.wait(10)
    try:
        steer(model, second)
    except ActError as error:
        errors.append(error)
    finally:
        release.set()
        holder.join()
    assert len(errors) == 1 and "already steered by thread 'request-1'" in str(errors[0])
    with steer(model, second), steer(model, first):  # one thread may stack, once it is free
        pass
    assert not model.blocks[0].norm._forward_hooks


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.random.default_rng(0).normal(size=(20, 4)), np.float32),
        lambda: torch.randn(4, 20).T,
        lambda: np.random.default_rng(0).normal(size=(20, 1)).astype(np.float32),
    ],
    ids=["fortran", "transposed", "width-1"],
)
def test_fitting_never_modifies_its_inputs(make):
    source, target = make(), make()
    copies = [x.copy() if isinstance(x, np.ndarray) else x.clone() for x in (source, target)]
    fit_transport({"x": source}, {"x": target * 2 + 1}, support="q05")
    for original, copy in zip((source, target), copies, strict=True):
        assert (original == copy).all()


def test_maps_that_overflow_float32_are_refused():
    units = torch.ones(2)
    infinite = torch.full((2,), float("inf"))
    with pytest.raises(ActError, match="overflows float32"):
        ModuleMap(units * 3e38, units * 0, -infinite, infinite, -infinite, infinite)
    transport = _transport(["blocks.0.norm"], units=8)
    with pytest.raises(ActError, match=r"'blocks.0.norm'.*strength 1e\+300.*overflows float32"):
        steer(Stack(), transport, 1e300)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ([["a", "b"], ["c", "d"]], "must be numbers"),
        (np.zeros((5, 0), np.float32), "no units"),
    ],
)
def test_unusable_samples_get_a_clear_error(source, message):
    target = np.ones((len(source), np.shape(source)[1]), np.float32)
    with pytest.raises(ActError, match=rf"module 'x'.*{message}"):
        fit_transport({"x": source}, {"x": target})
