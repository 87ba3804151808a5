"""`act.steer` for every kind of model: torch modules and diffusers pipelines."""

from __future__ import annotations

from typing import Any

from torch import nn

from .diffusion_pipeline import is_pipeline
from .diffusion_steering import PipelineSteering, steer_pipeline
from .errors import ActError
from .steering import Steering
from .steering import steer as steer_module
from .transport import Transport


def steer(
    model: Any, transport: Transport, strength: float = 1.0, **options: Any
) -> Steering | PipelineSteering:
    """Steer a torch module or a diffusers pipeline with `transport`; use it with `with`.

    A module: see `act.steering.steer` (options `active`, `rows`). A pipeline: every
    component the transport names; options `steps=(start, end)` (fractions of the sampling
    schedule) and `cond_only` (see `act.diffusion_steering.steer_pipeline`).
    """
    if isinstance(model, nn.Module):
        return steer_module(model, transport, strength, **options)
    if is_pipeline(model):
        return steer_pipeline(model, transport, strength, **options)
    raise ActError(
        f"cannot steer a {type(model).__name__}: pass a torch module or a diffusers pipeline"
    )
