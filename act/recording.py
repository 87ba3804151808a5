"""Recording pooled module outputs: one (D,) float32 sample per prompt and site.

Pooling (as in the paper): token outputs (B, T, D) are averaged over the non-padding tokens of
an attention mask (over all tokens without one); channel maps (B, C, H, W) over space; (B, D)
outputs are taken as they are. Outputs of 4 or more dimensions of last-axis modules
(LayerNorm, RMSNorm, Linear: e.g. (B, T, heads, D)) are tokens of their last axis. Only the
pooled rows are kept, so memory is O(N * D).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ActError, ModulesNeverRanError
from .hooks import group_by_module, holds_channels, is_channel_map, pick_output, resolve_module


def pool(
    tensor: torch.Tensor,
    attention_mask: torch.Tensor | None,
    site: str,
    channels: bool | None = None,
) -> torch.Tensor:
    """Pool a module output to (B, D) float32 (see the module docstring); `channels` says
    whether a 4-D/5-D output holds channels on axis 1 (None: it does)."""
    if is_channel_map(tensor, channels):
        return tensor.mean(dim=tuple(range(2, tensor.ndim)), dtype=torch.float32)
    if tensor.ndim >= 4:
        tensor = tensor.flatten(1, -2)
    if tensor.ndim == 2:
        return tensor.float()
    if tensor.ndim != 3:
        raise ActError(f"site {site!r} outputs shape {tuple(tensor.shape)}; cannot pool it")
    if attention_mask is None:
        return tensor.mean(dim=1, dtype=torch.float32)
    if attention_mask.shape != tensor.shape[:2]:
        raise ActError(
            f"site {site!r} outputs shape {tuple(tensor.shape)} but the attention mask has "
            f"shape {tuple(attention_mask.shape)}; the mask must be (batch, tokens)"
        )
    weights = attention_mask.to(device=tensor.device, dtype=torch.float32)
    counts = weights.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise ActError(f"site {site!r}: a row of the attention mask has no real token")
    return torch.bmm(weights.unsqueeze(1), tensor.float()).squeeze(1) / counts


Selector = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None]
"""`select(site, output) -> (rows to pool, attention mask or None)`, or None to skip the call."""


def pooled_sample(
    site: str,
    tensor: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    rows: slice | None = None,
    select: Selector | None = None,
    channels: bool | None = None,
) -> torch.Tensor | None:
    """Pool one module output to (B', D) float32 on the CPU, or None when `select` skips it.

    `select`, when given, decides the rows and mask per site and call (e.g. only the
    denoiser's first call, or only the text encoder's mask); otherwise `rows` and
    `attention_mask` apply to every site.
    """
    if select is not None:
        chosen = select(site, tensor)
        if chosen is None:
            return None
        tensor, attention_mask = chosen
    elif rows is not None:
        tensor = tensor[rows]
        attention_mask = None if attention_mask is None else attention_mask[rows]
    return pool(tensor, attention_mask, site, channels).cpu()


class Recorder:
    """Forward hooks that append pooled outputs of the given sites.

    Before each forward pass, set `attention_mask` (B, T) for token outputs with padding and
    `rows` (a slice of the batch, e.g. the conditional half of a CFG batch) as needed, or
    `select` to decide per site and call (see `pooled_sample`).
    """

    def __init__(self, model: nn.Module, sites: Sequence[str]) -> None:
        if not sites:
            raise ActError("no modules to record: the list of sites is empty")
        groups = group_by_module(sites)
        modules = {name: resolve_module(model, name) for name in groups}
        self.sites = list(sites)
        self.attention_mask: torch.Tensor | None = None
        self.rows: slice | None = None
        self.select: Selector | None = None
        self._rows: dict[str, list[torch.Tensor]] = {site: [] for site in self.sites}
        self._handles = []
        try:
            for name, entries in groups.items():
                self._handles.append(modules[name].register_forward_hook(self._hook(entries)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, entries: list[tuple[str, int | None]]):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            for site, index in entries:
                tensor = pick_output(output, index, site)
                pooled = self.pool(tensor, site, holds_channels(module, tensor, site))
                if pooled is not None:
                    self._rows[site].append(pooled)

        return hook

    def pool(
        self, tensor: torch.Tensor, site: str, channels: bool | None = None
    ) -> torch.Tensor | None:
        """Pool one output with the current mask, rows or selector (None: skipped)."""
        pooled = pooled_sample(
            site, tensor, self.attention_mask, self.rows, self.select, channels=channels
        )
        if pooled is None:
            return None
        previous = self._rows[site]
        if previous and previous[0].shape[1] != pooled.shape[1]:
            raise ActError(
                f"site {site!r} changed width between forward passes: "
                f"{previous[0].shape[1]} units, then {pooled.shape[1]}"
            )
        return pooled

    def samples(self) -> dict[str, torch.Tensor]:
        """Recorded samples so far: {site: (N, D) float32 CPU tensor}."""
        missing = [site for site, rows in self._rows.items() if not rows]
        if missing:
            raise ModulesNeverRanError(
                f"no activations were recorded for {missing}; these modules never ran", missing
            )
        return {site: torch.cat(rows) for site, rows in self._rows.items()}

    def take(self) -> dict[str, torch.Tensor]:
        """Return the recorded samples and start afresh."""
        samples = self.samples()
        for rows in self._rows.values():
            rows.clear()
        return samples

    def remove(self) -> None:
        """Remove the hooks (recorded samples stay available)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def record(model: nn.Module, sites: Sequence[str]) -> Recorder:
    """Record pooled outputs of `sites` (from `select_modules`) during forward passes.

        with record(model, sites) as recorder:
            recorder.attention_mask = batch["attention_mask"]
            model(**batch)
        samples = recorder.samples()   # {site: (N, D)}

    Hooks are removed on exit, also when the body raises.
    """
    return Recorder(model, sites)
