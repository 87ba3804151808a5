"""Adam over per-unit maps (omega, b), with a group-lasso proximal step that switches units
off exactly.

The penalty `sparsity * mean over units of |(omega - 1, b)|` is applied after each Adam step as
a proximal step in Adam's metric (step size lr / sqrt(v) per coordinate): a unit returns to
omega = 1, b = 0 exactly while the norm of its averaged gradient, times the number of units,
stays below `sparsity`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BETAS = (0.9, 0.999)
EPSILON = 1e-12


class SparseAdam:
    """Adam on pairs (omega, b) of per-unit tensors, then the proximal step of the penalty.

    **Mutates** the tensors in place (leaf tensors with `requires_grad`; their `.grad` is
    read and cleared by `step`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        learning_rate: float,
        sparsity: float = 0.0,
    ) -> None:
        self.pairs = list(pairs)
        self.learning_rate = learning_rate
        self.sparsity = sparsity
        self.moments = {
            id(t): (torch.zeros_like(t), torch.zeros_like(t)) for pair in self.pairs for t in pair
        }
        self.count = 0

    def step(self) -> None:
        """One update of every pair from the gradients in `.grad` (then cleared)."""
        self.count += 1
        with torch.no_grad():
            for omega, shift in self.pairs:
                sizes = [self._update(omega), self._update(shift)]
                if self.sparsity > 0:
                    self._shrink(omega, shift, (sizes[0] + sizes[1]) / 2)

    def _update(self, tensor: torch.Tensor) -> torch.Tensor:
        """Adam's update of one tensor; returns its per-coordinate step sizes."""
        gradient = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        mean, square = self.moments[id(tensor)]
        mean.mul_(BETAS[0]).add_(gradient, alpha=1 - BETAS[0])
        square.mul_(BETAS[1]).addcmul_(gradient, gradient, value=1 - BETAS[1])
        spread = (square / (1 - BETAS[1] ** self.count)).sqrt_()
        size = self.learning_rate / (spread + EPSILON)
        tensor.sub_(size * mean / (1 - BETAS[0] ** self.count))
        tensor.grad = None
        return size

    def _shrink(self, omega: torch.Tensor, shift: torch.Tensor, size: torch.Tensor) -> None:
        """Proximal step of `sparsity * mean over units of |(omega - 1, b)|` with step `size`:
        each unit's (omega - 1, b) shrinks towards 0 by `size * sparsity / units`, and is
        exactly 0 when shorter than that."""
        moved = omega - 1
        norm = torch.sqrt(moved.square() + shift.square())
        threshold = size * self.sparsity / omega.shape[0]
        keep = (1 - threshold / norm.clamp(min=1e-30)).clamp(min=0)
        omega.copy_(torch.where(keep > 0, 1 + keep * moved, 1.0))
        shift.mul_(keep)
