"""Autograd through ComfyUI's models, which were written for inference only.

Two things of theirs stand in the way of a backward pass:

- ComfyUI loads checkpoints inside inference mode, so their weights and buffers are
  inference tensors, which autograd refuses to save for a backward pass ("Inference tensors
  cannot be saved for backward"). `AutogradCopies.usable(module)` swaps a plain copy in for
  each of them while the module runs, and puts the original objects back afterwards, so
  model patchers never see the copies;
- their blocks add to activations in place (`x += attention(norm(x))` in CLIP, `img += ...`
  in FLUX), which changes a tensor autograd saved for the backward pass.
  `saved_activation_copies()` saves a copy of each differentiable activation instead.

`AutogradCopies.differentiable(module)` does both, with gradients enabled.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

# what autograd says of a saved tensor changed in place (nodes/end_to_end.py names the model)
MODIFIED_IN_PLACE = "modified by an inplace operation"


@contextlib.contextmanager
def saved_activation_copies() -> Iterator[None]:
    """While open, autograd saves a copy of every tensor it keeps for the backward pass that
    requires gradients (the activations downstream of the maps being trained), so code that
    then changes that tensor in place is differentiated correctly. A tensor saved by several
    operations is copied once per version. Other saved tensors (weights, inputs without
    gradients) are kept as they are, and the backward pass refuses one that was changed in
    place since, as autograd does without these hooks."""
    copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def pack(tensor: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        if not tensor.requires_grad:
            return tensor, tensor._version
        known = copies.get(id(tensor))
        if known is not None and known[0]() is tensor and known[1] == tensor._version:
            return known[2], None
        copy = tensor.detach().clone()
        copies[id(tensor)] = (weakref.ref(tensor), tensor._version, copy)
        return copy, None

    def unpack(packed: tuple[torch.Tensor, int | None]) -> torch.Tensor:
        tensor, version = packed
        if version is not None and tensor._version != version:
            raise RuntimeError(
                f"a tensor of shape {tuple(tensor.shape)} needed for gradient computation has "
                f"been {MODIFIED_IN_PLACE} (version {version} when saved, now "
                f"{tensor._version})"
            )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


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

    @contextlib.contextmanager
    def differentiable(self, root: nn.Module) -> Iterator[None]:
        """While open, `root` runs with gradients enabled, plain copies of its inference
        weights (`usable`) and copies of the activations autograd saves
        (`saved_activation_copies`)."""
        with torch.enable_grad(), self.usable(root), saved_activation_copies():
            yield

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
