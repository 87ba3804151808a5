"""Tiny torch models and maps shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn

from act import ModuleMap


class Block(nn.Module):
    """x + Linear(LayerNorm(x)): the residual block of the benchmarks, in miniature."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.norm(x))


class Stack(nn.Module):
    """A few residual blocks: token outputs (B, T, D)."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return h


class ConvNet(nn.Module):
    """Conv -> GroupNorm -> Conv: channel-map outputs (B, C, H, W)."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.conv_out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.norm(self.conv_in(x)))


class TwoOutputs(nn.Module):
    """A module returning a tuple, like a FLUX double-stream block."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.left = nn.Linear(width, width)
        self.right = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.left(x), self.right(x)


class Pair(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.block = TwoOutputs(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.block(x)
        return left * right


def random_map(units: int, *, bounded: bool = False, seed: int = 0) -> ModuleMap:
    """A map with omega in (0.5, 1.5) and beta in (-1, 1); bounds +-1 when `bounded`."""
    generator = torch.Generator().manual_seed(seed)
    omega = 0.5 + torch.rand(units, generator=generator)
    beta = torch.rand(units, generator=generator) * 2 - 1
    infinite = torch.full((units,), float("inf"))
    lo, hi = (-torch.ones(units), torch.ones(units)) if bounded else (-infinite, infinite)
    return ModuleMap(omega, beta, lo, hi, lo.clone(), hi.clone())
