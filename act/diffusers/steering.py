"""Steering a diffusers pipeline with a transport, optionally only in part of the sampling
schedule and only on the conditional branch of classifier-free guidance.

Denoiser maps follow the two controls:
- `steps=(start, end)`: the maps apply at step i of an N-step schedule when
  `start <= i / N < end` (positions in the scheduler's full schedule, so img2img at strength s
  starts at 1 - s). The step is found from the timestep of each denoiser call.
- `cond_only` (the default): only the conditional branch of classifier-free guidance is
  steered. SD/SDXL-style pipelines batch [uncond; cond] in one call: only the second half is
  steered. FLUX makes one conditional call per step, and with true CFG (a negative prompt
  and `true_cfg_scale > 1`) a second, unconditional call: that one is left alone (a call
  outside the pipeline's sampling loop, whose step cannot be told, is steered). Why it is the
  default: with guidance scale w the prediction is `u + w (c - u)`; steering both branches
  moves u and c alike, so the guidance difference, which carries the prompt, is unchanged
  and cancels most of the shift (measured on `bench/shapes` at guidance 5: a colour style
  reached 77% of images at strength 1 with both branches, 96% with the conditional one; see
  the README). Without guidance (distilled models, guidance scale <= 1) there is only the
  conditional branch, so both settings steer the same.
Text encoders run once, before sampling: their maps change the prompt embeddings that
condition every step, so a step range cannot apply to them and is refused for a transport
that steers them. With `cond_only` only the positive prompt's encoding is steered: the first
call of each text encoder after the last denoiser call (pipelines encode the prompt first,
the negative prompt second).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ActError, ModelMismatchError
from ..steering import Steering
from ..transport import Transport
from .anatomy import (
    StepClock,
    check_pipeline,
    denoiser_name,
    pipeline_modules,
)


class PipelineSteering:
    """Hooks steering a pipeline's components; remove them with `remove()` or `with`.

    Prefer `steer_pipeline(...)`, which constructs this. `strength` may be changed at any
    time and takes effect on the next module call.
    """

    def __init__(
        self,
        pipe: Any,
        transport: Transport,
        strength: float = 1.0,
        *,
        steps: Sequence[float] = (0.0, 1.0),
        cond_only: bool = True,
    ) -> None:
        check_pipeline(pipe, transport)
        self.steps = _step_range(steps)
        self.cond_only = bool(cond_only)
        self.pipe = pipe
        self.denoiser = denoiser_name(pipe)
        # FLUX-style pipelines run guidance as separate calls, SD-style ones in one batch.
        self._batched_guidance = hasattr(type(pipe), "do_classifier_free_guidance")
        restricted = self.steps != (0.0, 1.0)
        self._needs_clock = restricted or (self.cond_only and not self._batched_guidance)
        self._clock = StepClock(pipe)
        self._guidance = False
        self._encoder_calls: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._parts: list[Steering] = []
        components = list(dict.fromkeys(site.split(".", 1)[0] for site in transport.sites))
        encoders = [name for name in components if name != self.denoiser]
        if restricted and encoders:
            raise ActError(
                f"steps={steps!r} restricts denoiser modules only, but this transport also "
                f"steers {', '.join(encoders)}, whose output conditions every step; use a "
                "transport fitted with where='denoiser', or leave steps at (0, 1)"
            )
        modules = pipeline_modules(pipe)
        missing = [name for name in components if name not in modules]
        if missing:
            raise ModelMismatchError(
                f"the transport steers {', '.join(missing)}, which this {type(pipe).__name__} "
                f"lacks (it has {', '.join(modules)})"
            )
        try:
            for component in components:
                part = self._steering(
                    modules[component], component, transport.component(component), strength
                )
                self._parts.append(part)
            self._register()
        except BaseException:
            self.remove()
            raise
        self._strength = self._parts[0].strength

    def _steering(
        self, module: nn.Module, component: str, transport: Transport, strength: float
    ) -> Steering:
        if component == self.denoiser:
            return Steering(
                module,
                transport,
                strength,
                active=self._denoiser_active if self._needs_clock else None,
                rows=self._conditional_rows if self.cond_only else None,
            )
        active = (lambda: self._encoder_calls.get(component) == 1) if self.cond_only else None
        return Steering(module, transport, strength, active=active)

    def _register(self) -> None:
        modules = pipeline_modules(self.pipe)
        if self._needs_clock or self.cond_only:
            self._handles.append(
                modules[self.denoiser].register_forward_pre_hook(
                    self._before_denoiser, with_kwargs=True
                )
            )
        if self.cond_only:
            for name, module in modules.items():
                if name.startswith("text_encoder"):
                    self._handles.append(module.register_forward_pre_hook(self._counter(name)))

    def _before_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._encoder_calls.clear()
        self._guidance = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        if self._needs_clock:
            self._clock.update(args, kwargs)

    def _counter(self, name: str):
        def count(module: nn.Module, args: tuple) -> None:
            self._encoder_calls[name] = self._encoder_calls.get(name, 0) + 1

        return count

    def _denoiser_active(self) -> bool:
        clock = self._clock
        if clock.fraction is None and self.steps == (0.0, 1.0):
            return True  # cond_only on FLUX, outside the sampling loop: the only call we know
        if clock.fraction is None:
            raise ActError(
                f"cannot tell which sampling step this {self.denoiser} call belongs to: its "
                "timestep is not in pipe.scheduler.timesteps; step ranges need the "
                "pipeline's own sampling loop"
            )
        if self.cond_only and not self._batched_guidance and clock.call > 0:
            return False  # FLUX true CFG: the second call of a step is the negative prompt
        start, end = self.steps
        return start <= clock.fraction < end

    def _conditional_rows(self, batch: int) -> list[slice] | None:
        if self._guidance and batch % 2 == 0:
            return [slice(batch // 2, batch)]
        return None

    @property
    def strength(self) -> float:
        """Transport strength: 0 off, 1 full map, >1 extrapolation, <0 the inverse map."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        for part in self._parts:
            part.strength = value
        self._strength = self._parts[0].strength

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered."""
        return any(part.attached for part in self._parts)

    def remove(self) -> None:
        """Remove every hook; the pipeline computes exactly as before."""
        for part in self._parts:
            part.remove()
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> PipelineSteering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _step_range(steps: Sequence[float]) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in steps)
    except (TypeError, ValueError):
        start = end = float("nan")
    if not 0 <= start <= end <= 1:
        raise ActError(
            f"steps must be (start, end) fractions of the schedule with "
            f"0 <= start <= end <= 1, got {steps!r}"
        )
    return start, end


def steer_pipeline(
    pipe: Any,
    transport: Transport,
    strength: float = 1.0,
    *,
    steps: Sequence[float] = (0.0, 1.0),
    cond_only: bool = True,
) -> PipelineSteering:
    """Steer every pipeline component the transport names until the handle is removed.

        with steer_pipeline(pipe, transport, strength=1.0, steps=(0.0, 0.5)) as steering:
            image = pipe(prompt).images[0]
            steering.strength = 0.5   # takes effect on the next call

    Args:
        pipe: a diffusers pipeline of the architecture the transport was fitted on.
        transport: from `fit_pipeline` (or a file it saved).
        strength: 0 leaves the images bit-identical, 1 applies the full maps.
        steps: (start, end) fractions of the sampling schedule where denoiser maps apply.
        cond_only: steer only the conditional branch of classifier-free guidance (the
            default; with guidance, steering both branches cancels most of the shift: see
            the module docstring). False steers the negative prompt's branch too.

    Raises:
        ModelMismatchError: the pipeline has another architecture; no hook is left.
    """
    return PipelineSteering(pipe, transport, strength, steps=steps, cond_only=cond_only)
