"""Pooled recording: masks, channel maps, tuple outputs, and hook hygiene."""

import pytest
import torch
from helpers import ConvNet, Pair, Stack

from act import ActError, record, select_modules


@torch.no_grad()
def test_masked_mean_ignores_padding_tokens():
    model = Stack()
    x = torch.randn(2, 4, 4)
    padded = torch.cat([torch.randn(2, 3, 4) * 50, x], dim=1)  # left padding with junk
    mask = torch.cat([torch.zeros(2, 3), torch.ones(2, 4)], dim=1)
    with record(model, ["blocks.1.norm"]) as recorder:
        model(x)
        unpadded = recorder.take()["blocks.1.norm"]
        recorder.attention_mask = mask
        model(padded)
        masked = recorder.take()["blocks.1.norm"]
    # positions do not interact in this model, so real tokens give the same outputs
    torch.testing.assert_close(masked, unpadded, rtol=1e-5, atol=1e-5)
    expected = model.blocks[1].norm(model.blocks[0](model.embed(x))).mean(dim=1)
    torch.testing.assert_close(unpadded, expected)
    assert unpadded.shape == (2, 8) and unpadded.dtype == torch.float32


@torch.no_grad()
def test_channel_maps_are_pooled_over_space_and_rows_select_part_of_the_batch():
    conv = ConvNet()
    image = torch.randn(4, 3, 5, 5)
    with record(conv, ["norm"]) as recorder:
        recorder.rows = slice(2, 4)
        conv(image)
    samples = recorder.samples()["norm"]
    expected = conv.norm(conv.conv_in(image))[2:].mean(dim=(2, 3))
    torch.testing.assert_close(samples, expected)


@torch.no_grad()
def test_tuple_outputs_and_batches_accumulate_in_order():
    model = Pair()
    first, second = torch.randn(2, 8), torch.randn(3, 8)
    with record(model, select_modules(model, ["block:0", "block:1"])) as recorder:
        model(first)
        model(second)
    samples = recorder.samples()
    assert list(samples) == ["block:0", "block:1"]
    torch.testing.assert_close(samples["block:1"], model.block.right(torch.cat([first, second])))


def test_hooks_are_removed_on_error_and_bad_masks_are_named():
    model = Stack()
    with pytest.raises(ActError, match=r"attention mask has shape \(2, 9\)"):
        with record(model, ["blocks.0.norm"]) as recorder:
            recorder.attention_mask = torch.ones(2, 9)
            model(torch.randn(2, 4, 4))
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ActError, match="never ran"):
        with record(model, ["blocks.0.norm"]) as recorder:
            pass
        recorder.samples()
    with pytest.raises(ActError, match="no real token"):
        with record(model, ["blocks.0.norm"]) as recorder:
            recorder.attention_mask = torch.zeros(1, 4)
            model(torch.randn(1, 4, 4))
