"""Simultaneous and causal collection; causal schedules agree with the naive definition."""

from contextlib import ExitStack

import pytest
import torch
from helpers import Stack

from act import ActError, Batch, Transport, collect, fit_transport, record, steer


def _batches(model, count=4, size=3, calls=None):
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(size, 5, 4, generator=generator) for _ in range(count)]
    inputs[count // 2 :] = [x * 1.5 + 0.7 for x in inputs[count // 2 :]]

    def runner(x):
        def run():
            if calls is not None:
                calls.append(1)
            return model(x)

        return run

    labels = ["source"] * (count // 2) + ["target"] * (count - count // 2)
    return [Batch(runner(x), label) for x, label in zip(inputs, labels, strict=True)], inputs


SITES = ["blocks.0.norm", "blocks.1.norm", "blocks.2.norm"]


def _naive_causal(model, inputs, method, support):
    """The paper's definition, computed the slow way: refit from scratch for every module."""
    half = len(inputs) // 2
    maps = {}
    for site in SITES:
        samples = {}
        for label, group in (("source", inputs[:half]), ("target", inputs[half:])):
            with ExitStack() as stack, torch.no_grad():
                if maps:
                    stack.enter_context(steer(model, Transport(dict(maps), method, support, 1, 1)))
                recorder = stack.enter_context(record(model, [site]))
                for x in group:
                    model(x)
            samples[label] = recorder.samples()[site]
        fitted = fit_transport(
            {site: samples["source"]}, {site: samples["target"]}, method, support
        )
        maps[site] = fitted.maps[site]
    return maps


def test_simultaneous_collection_splits_labels_and_keeps_order():
    model = Stack()
    batches, inputs = _batches(model)
    progress = []
    samples = collect(model, SITES, batches, progress=lambda d, t: progress.append((d, t)))
    assert samples.sites == SITES and samples.causal is None
    assert samples.source["blocks.0.norm"].shape == (6, 8)
    with torch.no_grad():
        expected = model.blocks[0].norm(model.embed(torch.cat(inputs[2:]))).mean(dim=1)
    torch.testing.assert_close(samples.target["blocks.0.norm"], expected)
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert samples.model_class == "Stack"
    assert samples.module_params["blocks.0.norm"] == {"weight": [8], "bias": [8]}


@pytest.mark.parametrize("live", [None, 2])
def test_causal_schedules_match_the_naive_definition(live):
    model = Stack()
    calls: list[int] = []
    batches, inputs = _batches(model, calls=calls)
    samples = collect(
        model, SITES, batches, causal=True, method="linear", support="range", max_live_batches=live
    )
    expected = _naive_causal(model, inputs, "linear", "range")
    transport = samples.fit("linear", "range")
    assert transport.causal and transport.sites == SITES
    for site in SITES:
        torch.testing.assert_close(
            transport.maps[site].omega, expected[site].omega, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            transport.maps[site].beta, expected[site].beta, rtol=1e-5, atol=1e-6
        )
    simultaneous = collect(model, SITES, _batches(model)[0]).fit("linear", "range")
    assert torch.equal(simultaneous.maps[SITES[0]].omega, transport.maps[SITES[0]].omega)
    assert not torch.allclose(simultaneous.maps[SITES[2]].omega, transport.maps[SITES[2]].omega)
    assert len(calls) == (4 if live is None else 4 * len(SITES))  # lockstep: one pass per batch
    assert all(not m._forward_hooks for m in model.modules())


def test_causal_samples_refuse_other_fit_settings():
    model = Stack()
    samples = collect(model, SITES, _batches(model)[0], causal=True, support="all")
    with pytest.raises(ActError, match="collected causally"):
        samples.fit("mean", "all")
    assert samples.fit("linear", "all") is samples.fitted


def test_errors_inside_a_batch_propagate_and_leave_no_hooks_or_threads():
    import threading

    model = Stack()
    batches, _ = _batches(model)

    def explode():
        raise RuntimeError("interrupted by the user")

    batches[2] = Batch(explode, "target")
    before = threading.active_count()
    for live in (None, 1):
        with pytest.raises(RuntimeError, match="interrupted"):
            collect(model, SITES, batches, causal=True, max_live_batches=live)
        assert all(not m._forward_hooks for m in model.modules())
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="interrupted"):
        collect(model, SITES, batches)
    assert all(not m._forward_hooks for m in model.modules())


def test_cancelling_from_progress_stops_causal_collection():
    model = Stack()

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(model, SITES, _batches(model)[0], causal=True, progress=cancel)
    assert all(not m._forward_hooks for m in model.modules())


def test_modules_that_do_not_run_are_reported():
    model = Stack()
    batches, inputs = _batches(model)
    batches[3] = Batch(lambda: model.embed(inputs[3]), "target")
    for live in (None, 1):
        with pytest.raises(ActError, match="did not run for every batch"):
            collect(model, SITES, batches, causal=True, max_live_batches=live)
    with pytest.raises(ActError, match="source and target"):
        collect(model, SITES, [b for b in batches if b.label == "source"])
    with pytest.raises(ActError, match="label"):
        Batch(lambda: None, "positive")


def test_selectors_choose_rows_and_calls_per_site():
    model = Stack()
    batches, inputs = _batches(model, count=2)

    def second_call_only():
        calls = []

        def select(site, tensor):
            if site == "blocks.0.norm":
                calls.append(site)
                if len(calls) == 1:
                    return None
            return tensor[:2], None

        return select

    def twice(x, label):
        return Batch(lambda: (model(x), model(x * 0.5)), label, select=second_call_only())

    runs = [twice(x, b.label) for b, x in zip(batches, inputs, strict=True)]
    simultaneous = collect(model, SITES, runs)
    with torch.no_grad():
        expected = model.blocks[0].norm(model.embed(inputs[0][:2] * 0.5)).mean(dim=1)
    assert simultaneous.source["blocks.0.norm"].shape == (2, 8)
    assert simultaneous.source["blocks.1.norm"].shape == (4, 8)  # both calls of other sites
    torch.testing.assert_close(simultaneous.source["blocks.0.norm"], expected)
    runs = [twice(x, b.label) for b, x in zip(batches, inputs, strict=True)]
    causal = collect(model, ["blocks.0.norm"], runs, causal=True, support="all")
    torch.testing.assert_close(causal.source["blocks.0.norm"], expected)
