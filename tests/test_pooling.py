"""Per-token pooling: every real token a sample, its support bounds, and the fits it feeds."""

import numpy as np
import pytest
import torch
from helpers import ConvNet, Stack

from act import ActError, Batch, collect, fit_transport
from act.recording import Pooling, pool


def test_per_token_samples_are_the_real_tokens_in_order_and_average_to_the_mean():
    tokens = torch.randn(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    samples = pool(tokens, mask, "site", pooling=Pooling("tokens"))
    torch.testing.assert_close(samples, torch.cat([tokens[0, 2:], tokens[1]]))
    means = pool(tokens, mask, "site")
    torch.testing.assert_close(samples[:3].mean(0), means[0])
    torch.testing.assert_close(samples[3:].mean(0), means[1])


def test_per_token_samples_keep_at_most_max_tokens_evenly_spaced_per_row():
    tokens = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1)
    mask = torch.ones(2, 10)
    mask[1, :4] = 0  # row 1 has 6 real tokens: 4..9
    samples = pool(tokens, mask, "site", pooling=Pooling("tokens", max_tokens=4))
    assert samples.squeeze(1).tolist() == [0, 3, 6, 9, 14, 16, 17, 19]
    unmasked = pool(tokens, None, "site", pooling=Pooling("tokens", max_tokens=3))
    assert unmasked.squeeze(1).tolist() == [0, 4, 9, 10, 14, 19]


def test_channel_maps_stay_spatial_means_under_per_token_pooling():
    maps = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(
        pool(maps, None, "norm", pooling=Pooling("tokens")), maps.mean(dim=(2, 3))
    )


@pytest.mark.parametrize(
    ("kind", "limit", "message"),
    [("token", 64, "unknown pooling 'token'"), ("tokens", 0, "at least 1, got 0")],
)
def test_bad_pooling_settings_are_named(kind, limit, message):
    with pytest.raises(ActError, match=message):
        Pooling(kind, limit)


def _padded_batches(model, sides):
    """Batches of (x, mask) per label, x (B, T, 4) with left padding of junk."""
    batches = []
    for label, (x, mask) in sides.items():
        batches.append(Batch(lambda x=x: model(x), label, attention_mask=mask))
    return batches


@torch.no_grad()
def test_collect_per_token_counts_real_tokens_and_fits_with_their_bounds():
    model = Stack(width=8, depth=2)
    source = torch.randn(6, 7, 4)
    target = torch.randn(5, 7, 4) + 1
    source_mask = (torch.arange(7) >= torch.tensor([0, 1, 2, 3, 0, 4])[:, None]).float()
    target_mask = torch.ones(5, 7)
    sites = ["blocks.0.norm", "blocks.1.norm"]
    batches = _padded_batches(
        model, {"source": (source, source_mask), "target": (target, target_mask)}
    )
    samples = collect(model, sites, batches, pooling="tokens")
    assert samples.source["blocks.0.norm"].shape == (int(source_mask.sum()), 8)
    assert samples.target["blocks.0.norm"].shape == (35, 8)
    transport = samples.fit("linear", "range")
    assert transport.info["pooling"] == "tokens" and transport.source_samples == 32
    own = samples.source["blocks.0.norm"]
    reference = fit_transport(
        {"site": own}, {"site": samples.target["blocks.0.norm"]}, "linear", "range"
    ).maps["site"]
    torch.testing.assert_close(transport.maps["blocks.0.norm"].omega, reference.omega)
    torch.testing.assert_close(transport.maps["blocks.0.norm"].source_lo, own.min(0).values)
    torch.testing.assert_close(transport.maps["blocks.0.norm"].source_hi, own.max(0).values)
    assert "per token" in samples.summary()


def test_per_token_bounds_cover_the_token_elements_that_pooled_bounds_miss():
    """Token elements spread as N(0, 1); a prompt's mean of 12 tokens only as N(0, 1/12): the
    pooled range holds a small central slice of the elements the steering hook gates."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(64, 12, 16, generator=generator)
    mask = torch.ones(64, 12)
    per_token = pool(tokens, mask, "site", pooling=Pooling("tokens"))
    pooled = pool(tokens, mask, "site")

    def inside(samples):
        lo, hi = samples.min(0).values, samples.max(0).values
        return float(((tokens > lo) & (tokens < hi)).float().mean())

    assert inside(per_token) > 0.99
    assert inside(pooled) < 0.75


def test_per_prompt_fits_refuse_unequal_counts_and_per_token_fits_take_them():
    rng = np.random.default_rng(0)
    source = {"a": rng.normal(size=(10, 3)), "b": rng.normal(size=(14, 3))}
    target = {"a": rng.normal(size=(10, 3)) + 1, "b": rng.normal(size=(12, 3)) + 1}
    with pytest.raises(ActError, match="per_prompt=False"):
        fit_transport(source, target)
    transport = fit_transport(source, target, per_prompt=False)
    assert (transport.source_samples, transport.target_samples) == (10, 10)


@torch.no_grad()
def test_causal_per_token_first_map_equals_the_simultaneous_one():
    model = Stack(width=8, depth=2)
    x_source, x_target = torch.randn(4, 6, 4), torch.randn(4, 6, 4) + 0.5
    mask = torch.ones(4, 6)
    mask[:2, :2] = 0
    sides = {"source": (x_source, mask), "target": (x_target, mask)}
    sites = ["blocks.0.norm", "blocks.1.norm"]
    causal = collect(
        model, sites, _padded_batches(model, sides), causal=True, support="all", pooling="tokens"
    )
    simultaneous = collect(model, sites, _padded_batches(model, sides), pooling="tokens")
    first_causal = causal.fit("linear", "all").maps["blocks.0.norm"]
    first = simultaneous.fit("linear", "all").maps["blocks.0.norm"]
    torch.testing.assert_close(first_causal.omega, first.omega)
    assert causal.source["blocks.1.norm"].shape == (20, 8)
    later = causal.fit("linear", "all").maps["blocks.1.norm"].omega
    assert not torch.allclose(later, simultaneous.fit("linear", "all").maps["blocks.1.norm"].omega)


@torch.no_grad()
def test_per_token_pooling_of_a_conv_net_equals_mean_pooling():
    net = ConvNet()
    source, target = torch.randn(3, 3, 6, 6), torch.randn(3, 3, 6, 6) + 1
    batches = [Batch(lambda: net(source), "source"), Batch(lambda: net(target), "target")]
    tokens = collect(net, ["norm"], batches, pooling="tokens")
    means = collect(net, ["norm"], batches)
    torch.testing.assert_close(tokens.source["norm"], means.source["norm"])
