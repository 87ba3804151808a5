"""Folding maps into weights: equal to hooks, exactly restorable, refused where inexact."""

import pytest
import torch
from helpers import ConvNet, Pair, Stack, random_map
from torch import nn

from act import ActError, Transport, bake, bake_deltas, steer


def _transport(maps, support="all"):
    return Transport(maps, "linear", support, 16, 16)


@torch.no_grad()
@pytest.mark.parametrize("strength", [1.0, 0.4, -0.7, 1.5])
def test_baked_equals_hooked_and_restores_exactly(strength):
    model = Stack()
    x = torch.randn(2, 5, 4)
    transport = _transport(
        {
            "embed": random_map(8, seed=1),
            "blocks.0.norm": random_map(8, seed=2),
            "blocks.1.proj": random_map(8, seed=3),
        }
    )
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with steer(model, transport, strength):
        hooked = model(x)
    with bake(model, transport, strength):
        baked = model(x)
        assert not torch.equal(model.blocks[0].norm.weight, originals["blocks.0.norm.weight"])
    torch.testing.assert_close(baked, hooked, rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key


def test_deltas_name_parameters_and_leave_the_model_alone():
    model = Stack()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module_map = random_map(8)
    deltas = bake_deltas(model, _transport({"blocks.2.norm": module_map}), 0.5)
    assert set(deltas) == {"blocks.2.norm.weight", "blocks.2.norm.bias"}
    scale = 1 + 0.5 * (module_map.omega - 1)
    expected = before["blocks.2.norm.weight"] * (scale - 1)
    torch.testing.assert_close(deltas["blocks.2.norm.weight"], expected)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("model", "site", "support", "message"),
    [
        (Stack(), "blocks.0.norm", "range", "support 'range'"),
        (ConvNet(), "norm", "all", "channel maps"),
        (Pair(), "block:0", "all", "tuple output"),
        (Stack(), "blocks.0", "all", "only nn.Linear and nn.LayerNorm"),
        (nn.Sequential(nn.RMSNorm(8)), "0", "all", "has no bias"),
        (nn.Sequential(nn.Linear(4, 8, bias=False)), "0", "all", "no bias"),
    ],
)
def test_inexact_folds_are_refused_naming_module_and_reason(model, site, support, message):
    units = 6 if isinstance(model, ConvNet) else 8
    transport = _transport({site: random_map(units, bounded=support != "all")}, support)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ActError) as raised:
        bake(model, transport)
    assert message in str(raised.value) and repr(site) in str(raised.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
