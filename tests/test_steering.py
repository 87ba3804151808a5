"""Hook semantics: identities at strength 0, removal, support gate, 4-D maps, dtypes."""

import pytest
import torch
from helpers import ConvNet, Pair, Stack, random_map
from torch import nn

from act import ActError, Batch, ModelMismatchError, ModuleMap, Transport, collect, steer


def _transport(maps: dict[str, ModuleMap], **kwargs) -> Transport:
    return Transport(maps, "linear", kwargs.pop("support", "all"), 16, 16, **kwargs)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


@torch.no_grad()
def test_strength_zero_is_bit_identical():
    model = Stack()
    x = torch.randn(2, 5, 4)
    plain = model(x)
    transport = _transport({f"blocks.{i}.norm": random_map(8, seed=i) for i in range(3)})
    with steer(model, transport, strength=0.0):
        assert torch.equal(model(x), plain)
    conv = ConvNet()
    image = torch.randn(2, 3, 5, 5)
    plain_image = conv(image)
    with steer(conv, _transport({"norm": random_map(6)}), strength=0.0):
        assert torch.equal(conv(image), plain_image)


@torch.no_grad()
def test_full_strength_applies_the_map_per_token():
    model = Stack(depth=1)
    x = torch.randn(3, 4, 4)
    module_map = random_map(8)
    block = model.blocks[0]
    h = model.embed(x)
    expected = h + block.proj(module_map.apply(block.norm(h)))
    with steer(model, _transport({"blocks.0.norm": module_map})):
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    half = module_map.omega * 0.5 + 0.5
    manual = block.norm(h) * half + 0.5 * module_map.beta
    with steer(model, _transport({"blocks.0.norm": module_map}), strength=0.5):
        torch.testing.assert_close(model(x), h + block.proj(manual), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_leaving_the_context_restores_outputs_and_removes_hooks_even_on_error():
    model = Stack()
    x = torch.randn(2, 5, 4)
    plain = model(x)
    transport = _transport({"blocks.1.norm": random_map(8)})
    with steer(model, transport) as steering:
        assert not torch.equal(model(x), plain)
        assert steering.attached
    assert _no_hooks(model) and not steering.attached
    assert torch.equal(model(x), plain)
    with pytest.raises(RuntimeError, match="boom"), steer(model, transport):
        raise RuntimeError("boom")
    assert _no_hooks(model)
    assert torch.equal(model(x), plain)


@torch.no_grad()
def test_support_gate_leaves_outside_values_unchanged():
    module_map = random_map(4, bounded=True)  # support (-1, 1)
    layer = nn.Identity()
    values = torch.tensor([[-3.0, -0.5, 0.5, 1.0], [-1.0, 0.0, 2.0, 0.9]])
    wrapper = nn.Sequential(layer)
    with steer(wrapper, _transport({"0": module_map}, support="range")):
        out = wrapper(values)
    inside = (values > -1) & (values < 1)
    expected = torch.where(inside, values * module_map.omega + module_map.beta, values)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[~inside], values[~inside])


@torch.no_grad()
def test_channel_maps_shift_every_pixel_by_the_transported_mean():
    conv = ConvNet()
    image = torch.randn(4, 3, 6, 6)
    base = random_map(6)
    bound = torch.full((6,), 0.1)
    module_map = ModuleMap(base.omega, base.beta, -bound, bound, -bound, bound)
    features = conv.norm(conv.conv_in(image))
    mean = features.mean(dim=(2, 3))
    moved = mean * module_map.omega + module_map.beta
    inside = (mean > -0.1) & (mean < 0.1)
    delta = torch.where(inside, moved - mean, torch.zeros_like(mean))
    expected = conv.conv_out(features + delta[:, :, None, None])
    with steer(conv, _transport({"norm": module_map}, support="range")):
        torch.testing.assert_close(conv(image), expected, rtol=1e-5, atol=1e-5)
    assert inside.any() and not inside.all()


@torch.no_grad()
def test_inverse_after_forward_is_the_identity():
    model = Stack()
    x = torch.randn(2, 5, 4)
    plain = model(x)
    transport = _transport({"blocks.0.norm": random_map(8), "blocks.2.norm": random_map(8, seed=3)})
    with steer(model, transport, 1.0), steer(model, transport, -1.0):
        torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-5)
    with steer(model, transport, 0.5), steer(model, transport, -0.5):
        assert not torch.allclose(model(x), plain, atol=1e-3)  # interpolations are not inverses


@torch.no_grad()
def test_negative_strength_uses_the_target_support():
    omega, beta = torch.full((2,), 2.0), torch.full((2,), 1.0)
    module_map = ModuleMap(
        omega, beta, torch.full((2,), -1.0), torch.full((2,), 1.0), torch.zeros(2), torch.ones(2)
    )
    wrapper = nn.Sequential(nn.Identity())
    values = torch.tensor([[0.5, 2.0]])
    with steer(wrapper, _transport({"0": module_map}, support="range"), strength=-1.0):
        out = wrapper(values)
    assert out.tolist() == [[(0.5 - 1.0) / 2.0, 2.0]]


@torch.no_grad()
def test_half_precision_module_is_steered_in_float32_and_keeps_its_dtype():
    model = Stack().half()
    x = torch.randn(2, 5, 4).half()
    module_map = random_map(8)
    with steer(model, _transport({"blocks.0.norm": module_map})):
        out = model(x)
    assert out.dtype == torch.float16
    reference = Stack()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with steer(reference, _transport({"blocks.0.norm": module_map})):
        expected = reference(x.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    with steer(model, _transport({"blocks.0.norm": random_map(8, bounded=True)}, support="range")):
        assert model(x).dtype == torch.float16


@torch.no_grad()
def test_strength_can_change_while_steering():
    model = Stack()
    x = torch.randn(2, 5, 4)
    plain = model(x)
    transport = _transport({"blocks.0.norm": random_map(8)})
    with steer(model, transport, 1.0) as steering:
        full = model(x)
        handles = len(model.blocks[0].norm._forward_hooks)
        steering.strength = 0.0
        assert torch.equal(model(x), plain)
        steering.strength = 1.0
        assert torch.equal(model(x), full)
        assert len(model.blocks[0].norm._forward_hooks) == handles == 1
        with pytest.raises(ActError, match="strength must be a number"):
            steering.strength = "strong"
        with pytest.raises(ActError, match="finite"):
            steering.strength = float("nan")


@torch.no_grad()
def test_tuple_outputs_are_addressed_by_index():
    model = Pair()
    x = torch.randn(3, 8)
    module_map = random_map(8)
    left, right = model.block(x)
    with steer(model, _transport({"block:1": module_map})):
        torch.testing.assert_close(model(x), left * module_map.apply(right))
    with (
        pytest.raises(ActError, match="not a tensor"),
        steer(model, _transport({"block": module_map})),
    ):
        model(x)
    assert _no_hooks(model)


def test_missing_module_is_rejected_with_near_matches_and_no_hooks_left():
    model = Stack()
    transport = _transport({"blocks.0.norm": random_map(8), "blocks.7.norm": random_map(8)})
    with pytest.raises(ModelMismatchError, match=r"'blocks.7.norm' not found.*near matches"):
        steer(model, transport)
    assert _no_hooks(model)


@torch.no_grad()
def test_other_width_is_rejected_naming_the_module_and_both_shapes():
    transport = _transport(
        {"blocks.0.norm": random_map(8)},
        model_class="Stack",
        module_params={"blocks.0.norm": {"weight": [8], "bias": [8]}},
    )
    wide = Stack(width=12)
    with pytest.raises(ModelMismatchError, match=r"'blocks.0.norm'.*\(12,\).*\(8,\).*Stack"):
        steer(wide, transport)
    assert _no_hooks(wide)
    unknown = _transport({"blocks.0": random_map(8)})  # a block: no own parameters to compare
    with pytest.raises(ModelMismatchError, match=r"'blocks.0' outputs shape \(1, 2, 12\).*8 units"):
        with steer(wide, unknown):
            wide(torch.randn(1, 2, 4))
    assert _no_hooks(wide)


def test_outputs_that_alias_inputs_are_not_modified_in_place():
    wrapper = nn.Sequential(nn.Identity(), nn.Identity())
    values = torch.randn(2, 8)
    original = values.clone()
    with torch.no_grad(), steer(wrapper, _transport({"0": random_map(8)})):
        out = wrapper(values)
    assert torch.equal(values, original)
    assert not torch.equal(out, original)


def test_gradients_flow_through_the_map():
    model = Stack()
    x = torch.randn(2, 5, 4)
    module_map = random_map(8)
    with steer(model, _transport({"blocks.0.norm": module_map})):
        model(x).sum().backward()
    gradient = model.embed.weight.grad
    assert gradient is not None and torch.isfinite(gradient).all()


@torch.no_grad()
def test_rows_and_active_restrict_where_and_when_steering_applies():
    model = Stack()
    x = torch.randn(4, 5, 4)
    plain = model(x)
    transport = _transport({"blocks.0.norm": random_map(8)})
    with steer(model, transport, rows=lambda batch: [slice(batch // 2, batch)]):
        out = model(x)
    assert torch.equal(out[:2], plain[:2])
    assert not torch.allclose(out[2:], plain[2:])
    enabled = {"on": False}
    with steer(model, transport, active=lambda: enabled["on"]):
        assert torch.equal(model(x), plain)
        enabled["on"] = True
        assert not torch.equal(model(x), plain)


class HeadNorm(nn.Module):
    """Attention q/k norms: a LayerNorm over the head dimension of (B, T, heads, D)."""

    def __init__(self, heads: int = 3, head_dim: int = 4) -> None:
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.view(*x.shape[:2], self.heads, -1))


def test_four_dimensional_outputs_of_last_axis_modules_map_their_last_axis():
    model = HeadNorm()
    batches = [
        Batch(lambda: model(torch.randn(5, 7, 12)), "source"),
        Batch(lambda: model(torch.randn(5, 7, 12) * 2 + 1), "target"),
    ]
    transport = collect(model, ["norm"], batches).fit(support="all")
    assert transport.maps["norm"].units == 4  # the head dimension, not the 7 tokens
    inputs = torch.randn(2, 11, 12)  # another number of tokens ("another resolution")
    plain = model(inputs)
    with torch.no_grad(), steer(model, transport):
        steered = model(inputs)
    assert torch.allclose(steered, transport.maps["norm"].apply(plain), atol=1e-6)


SIDES = ("source", "target")


class LayerNorm2d(nn.LayerNorm):
    """Stable Cascade's norm of channel maps: a LayerNorm over the channels of (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [5, 6])  # 6: as wide as the channels, told apart by its name
def test_norms_of_channel_maps_map_their_channels(size):
    model = nn.Sequential(LayerNorm2d(6))
    batches = [
        Batch(lambda: model(torch.randn(4, 6, size, size)), "source"),
        Batch(lambda: model(torch.randn(4, 6, size, size) * 2 + 1), "target"),
    ]
    transport = collect(model, ["0"], batches).fit(support="all")
    assert transport.maps["0"].units == 6
    plain = model(torch.randn(2, 6, 9, 3))  # another resolution
    with torch.no_grad(), steer(model, transport):
        steered = model(torch.randn(2, 6, 9, 3))
    assert steered.shape == plain.shape and not torch.equal(steered, plain)


def test_four_dimensional_outputs_whose_units_cannot_be_told_apart_are_refused():
    class Heads(nn.Module):  # (B, T, heads, D) out of a module that names no axis
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:2], 3, 4) * 2

    model = nn.Sequential(Heads())
    batches = [Batch(lambda: model(torch.randn(5, 7, 12)), label) for label in SIDES]
    with pytest.raises(ActError, match=r"units of '0' cannot be told apart: .*\(5, 7, 3, 4\)"):
        collect(model, ["0"], batches)
    assert not model[0]._forward_hooks
