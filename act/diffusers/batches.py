"""Pipeline calls as collection batches: which denoiser calls, rows and tokens to record.

Each batch is one pipeline call. Pre-hooks on the denoiser and the text encoders tell its
selector what the current call is: the denoiser is recorded at the chosen steps (counted from
its first call), on the conditional rows only ([uncond; cond] with classifier-free guidance);
each text encoder on its first call (the positive prompt; a negative prompt comes second),
pooled over the tokens up to the first end-of-text token. The call is stopped, from the next
hook, once everything is recorded.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ActError
from ..samples import Batch
from .anatomy import StepClock, denoiser_name, pipeline_modules


class _Finished(Exception):
    """Stops a pipeline call once everything it had to record is recorded."""


@dataclass
class _Run:
    """What one batch (one pipeline call) still has to record, and what it is recording."""

    prompts: int
    steps: set[int]
    encoders: set[str]
    encoder_calls: dict[str, int] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    first: int | None = None
    recording: bool = False

    @property
    def complete(self) -> bool:
        return not self.steps and not self.encoders


class Collector:
    """Pre-hooks on the denoiser and text encoders that steer each batch's selector."""

    def __init__(self, pipe: Any, components: Sequence[str], at_steps: Sequence[int]) -> None:
        self.pipe = pipe
        self.denoiser = denoiser_name(pipe)
        self.at_steps = set(at_steps) if self.denoiser in components else set()
        self.encoders = [name for name in components if name != self.denoiser]
        self.clock = StepClock(pipe)
        self.local = threading.local()  # the batch each thread runs (causal runs use threads)
        self.eos = {name: _end_of_text(pipe, name) for name in self.encoders}

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Register the pre-hooks for the duration of the block."""
        modules = pipeline_modules(self.pipe)
        handles = []
        try:
            handles.append(
                modules[self.denoiser].register_forward_pre_hook(
                    self._before_denoiser, with_kwargs=True
                )
            )
            for name in self.encoders:
                handles.append(
                    modules[name].register_forward_pre_hook(
                        self._before_encoder(name), with_kwargs=True
                    )
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def batch(
        self, prompts: list[str], label: str, seed: int, kwargs: dict, autograd: bool = False
    ) -> Batch:
        """One pipeline call on `prompts` (a fresh `_Run` each time: causal runs repeat it).

        With `autograd` the call lets gradients through (for end-to-end fitting): diffusers
        pipelines decorate `__call__` with `torch.no_grad`, so the undecorated one is called.
        """
        pipe = _with_autograd(self.pipe) if autograd else self.pipe

        # SD wants a list of negative prompts with a list of prompts.
        arguments = {
            key: [value] * len(prompts)
            if key.startswith("negative_prompt") and isinstance(value, str)
            else value
            for key, value in kwargs.items()
        }

        def call() -> None:
            run = self.local.run = _Run(len(prompts), set(self.at_steps), set(self.encoders))
            try:
                generator = torch.Generator("cpu").manual_seed(seed)
                pipe(prompt=prompts, generator=generator, output_type="latent", **arguments)
            except _Finished:
                if getattr(self.pipe, "_current_timestep", None) is not None:
                    self.pipe._current_timestep = None  # as FLUX leaves it after a full call
            finally:
                self.local.run = None
            if run.steps:
                raise ActError(
                    f"denoising step(s) {sorted(run.steps)} never ran; the pipeline ran "
                    f"{self.clock.total} steps (pass num_inference_steps=)"
                )
            if run.encoders:
                raise ActError(f"the pipeline never called {sorted(run.encoders)}")

        return Batch(call, label, select=self._select)

    def _select(self, site: str, tensor: torch.Tensor):
        run = getattr(self.local, "run", None)
        if run is None:
            return None  # the model ran outside a batch
        component = site.split(".", 1)[0]
        if component == self.denoiser:
            return _conditional_rows(tensor, run.prompts, site) if run.recording else None
        if run.encoder_calls.get(component) != 1:
            return None  # a negative prompt's encoding
        return tensor, run.masks[component] if tensor.ndim == 3 else None

    def _before_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        run = getattr(self.local, "run", None)
        if run is None:
            return
        if run.complete:
            raise _Finished
        self.clock.update(args, kwargs)
        if self.clock.index is None:
            raise ActError(
                "cannot tell the sampling step of a denoiser call: its timestep is not in "
                "pipe.scheduler.timesteps"
            )
        if run.first is None:
            run.first = self.clock.index
        step = self.clock.index - run.first
        run.recording = self.clock.call == 0 and step in run.steps
        if run.recording:
            run.steps.discard(step)

    def _before_encoder(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            run = getattr(self.local, "run", None)
            if run is None:
                return
            if run.complete:
                raise _Finished
            run.encoder_calls[name] = run.encoder_calls.get(name, 0) + 1
            if run.encoder_calls[name] == 1:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                run.masks[name] = real_tokens(ids, self.eos[name]) if mask is None else mask.bool()
                run.encoders.discard(name)

        return hook


def _with_autograd(pipe: Any) -> Any:
    """`pipe.__call__` without its `torch.no_grad` (or any other) decorator, bound to `pipe`."""
    return functools.partial(inspect.unwrap(type(pipe).__call__), pipe)


def real_tokens(input_ids: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, T) mask of the tokens up to and including the first end-of-text token (all tokens of
    a row without one): pipelines pad prompts but pass no attention mask."""
    is_eos = (input_ids == eos).int()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


def _end_of_text(pipe: Any, encoder: str) -> int:
    tokenizer_name = encoder.replace("text_encoder", "tokenizer")
    eos = getattr(getattr(pipe, tokenizer_name, None), "eos_token_id", None)
    if eos is None:
        raise ActError(
            f"cannot pool {encoder} over real tokens: the pipeline's {tokenizer_name} is "
            "missing or has no end-of-text token"
        )
    return eos


def _conditional_rows(tensor: torch.Tensor, prompts: int, site: str):
    rows = tensor.shape[0]
    if rows not in (prompts, 2 * prompts):
        raise ActError(
            f"site {site!r}: the denoiser ran on {rows} rows for {prompts} prompts; expected "
            f"{prompts}, or {2 * prompts} with classifier-free guidance"
        )
    return tensor[rows - prompts :], None  # [uncond; cond] with guidance: the second half
