"""Recording module outputs as (N, D) float32 samples per site.

Two poolings of token outputs (B, T, D):
- "mean" (the paper's): one sample per prompt, the mean over the non-padding tokens of an
  attention mask (over all tokens without one). Memory O(prompts * D).
- "tokens": every real token of every prompt is a sample (padding excluded by the mask), at
  most `max_tokens` per prompt, evenly spaced over its real tokens when there are more (a
  UNet's spatial tokens, long sentences). Memory at most 4 * max_tokens * D bytes per prompt
  and site. A one-word attribute is one token of a prompt: its own samples keep it, a mean
  dilutes it.
Channel maps (B, C, H, W) are averaged over space under either pooling (their maps shift
whole channels); (B, D) outputs are taken as they are. Outputs of 4 or more dimensions of
last-axis modules (LayerNorm, RMSNorm, Linear: e.g. (B, T, heads, D)) are tokens of their
last axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ActError, ModulesNeverRanError
from .hooks import group_by_module, holds_channels, is_channel_map, pick_output, resolve_module

POOLINGS = ("mean", "tokens")
DEFAULT_MAX_TOKENS = 64


@dataclass(frozen=True)
class Pooling:
    """How token outputs become samples: "mean" or "tokens" (see the module docstring)."""

    kind: str = "mean"
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        if self.kind not in POOLINGS:
            raise ActError(
                f"unknown pooling {self.kind!r}; use 'mean' (one sample per prompt, the mean "
                "of its real tokens) or 'tokens' (every real token a sample)"
            )
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ActError(f"max_tokens must be a whole number, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ActError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def per_token(self) -> bool:
        """Whether a prompt gives one sample per real token."""
        return self.kind == "tokens"


MEAN = Pooling()


def pool(
    tensor: torch.Tensor,
    attention_mask: torch.Tensor | None,
    site: str,
    channels: bool | None = None,
    pooling: Pooling = MEAN,
) -> torch.Tensor:
    """Pool a module output to (N, D) float32 samples (see the module docstring): N is the
    batch size, or with per-token pooling of token outputs the real tokens kept. `channels`
    says whether a 4-D/5-D output holds channels on axis 1 (None: it does)."""
    if is_channel_map(tensor, channels):
        return tensor.mean(dim=tuple(range(2, tensor.ndim)), dtype=torch.float32)
    if tensor.ndim >= 4:
        tensor = tensor.flatten(1, -2)
    if tensor.ndim == 2:
        return tensor.float()
    if tensor.ndim != 3:
        raise ActError(f"site {site!r} outputs shape {tuple(tensor.shape)}; cannot pool it")
    if attention_mask is None:
        if pooling.per_token:
            return _kept_tokens(tensor, None, pooling.max_tokens)
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
    if pooling.per_token:
        return _kept_tokens(tensor, weights > 0, pooling.max_tokens)
    return torch.bmm(weights.unsqueeze(1), tensor.float()).squeeze(1) / counts


def _kept_tokens(tensor: torch.Tensor, real: torch.Tensor | None, limit: int) -> torch.Tensor:
    """The real tokens of each row of (B, T, D), at most `limit` per row evenly spaced over
    them, stacked to (N, D) float32 in row order."""
    rows = []
    for row in range(tensor.shape[0]):
        if real is None:
            positions = torch.arange(tensor.shape[1], device=tensor.device)
        else:
            positions = real[row].nonzero().squeeze(1)
        if len(positions) > limit:
            spaced = torch.linspace(0, len(positions) - 1, limit, device=tensor.device)
            positions = positions[spaced.round().long()]
        rows.append(tensor[row, positions].float())
    return torch.cat(rows)


Selector = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None] | None]
"""`select(site, output) -> (rows to pool, attention mask or None)`, or None to skip the call."""


def pooled_sample(
    site: str,
    tensor: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    rows: slice | None = None,
    select: Selector | None = None,
    channels: bool | None = None,
    pooling: Pooling = MEAN,
) -> torch.Tensor | None:
    """Pool one module output to (N, D) float32 on the CPU, or None when `select` skips it.

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
    return pool(tensor, attention_mask, site, channels, pooling).cpu()


class Recorder:
    """Forward hooks that append pooled outputs of the given sites.

    Before each forward pass, set `attention_mask` (B, T) for token outputs with padding and
    `rows` (a slice of the batch, e.g. the conditional half of a CFG batch) as needed, or
    `select` to decide per site and call (see `pooled_sample`). `pooling` says how token
    outputs become samples.
    """

    def __init__(self, model: nn.Module, sites: Sequence[str], pooling: Pooling = MEAN) -> None:
        if not sites:
            raise ActError("no modules to record: the list of sites is empty")
        groups = group_by_module(sites)
        modules = {name: resolve_module(model, name) for name in groups}
        self.sites = list(sites)
        self.pooling = pooling
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
            site, tensor, self.attention_mask, self.rows, self.select, channels, self.pooling
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


def record(model: nn.Module, sites: Sequence[str], pooling: Pooling = MEAN) -> Recorder:
    """Record pooled outputs of `sites` (from `select_modules`) during forward passes.

        with record(model, sites) as recorder:
            recorder.attention_mask = batch["attention_mask"]
            model(**batch)
        samples = recorder.samples()   # {site: (N, D)}

    Hooks are removed on exit, also when the body raises.
    """
    return Recorder(model, sites, pooling)
