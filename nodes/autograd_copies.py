"""Weights that autograd can save, in a model loaded under `torch.inference_mode()`.

ComfyUI loads checkpoints inside inference mode, so their weights and buffers are inference
tensors, which autograd refuses to save for a backward pass ("Inference tensors cannot be
saved for backward"). `AutogradCopies.usable(module)` swaps a plain copy in for each of them
while the module runs, and puts the original objects back afterwards, so model patchers
never see the copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class AutogradCopies:
    """Plain copies of a model's inference-tensor weights and buffers, swapped in while a
    part runs so that autograd can save them."""

    def __init__(self) -> None:
        self._copies: dict[tuple[int, str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def usable(self, root: nn.Module) -> Iterator[None]:
        """While open, every inference tensor among `root`'s parameters and buffers is
        replaced in its module by a plain copy (made on first use, then reused); the original
        objects are put back on exit, also on error."""
        swapped: list[tuple[nn.Module, str, str, torch.Tensor]] = []
        try:
            with torch.inference_mode(False):
                for module in root.modules():
                    for kind in ("_parameters", "_buffers"):
                        for name, tensor in getattr(module, kind).items():
                            if tensor is not None and tensor.is_inference():
                                getattr(module, kind)[name] = self._copy(module, kind, name, tensor)
                                swapped.append((module, kind, name, tensor))
            yield
        finally:
            for module, kind, name, tensor in swapped:
                getattr(module, kind)[name] = tensor

    def _copy(self, module: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        key = (id(module), kind, name)
        known = self._copies.get(key)
        if known is not None and known[0] is tensor:
            return known[1]
        copy = tensor.clone()
        if kind == "_parameters":
            copy = nn.Parameter(copy, requires_grad=False)
        self._copies[key] = (tensor, copy)
        return copy

    def clear(self) -> None:
        """Drop every copy."""
        self._copies.clear()
