"""Anatomy of a diffusers pipeline: its components, one module root over them, architecture
fingerprints, and which sampling step a denoiser call belongs to.

Pipelines are handled by duck typing (a `components` dict of modules and a `scheduler`), so
this module does not import diffusers. Site names on the root are the pipeline's own module
names prefixed by component: `unet.mid_block.resnets.0.norm1`, `text_encoder_2.…`,
`transformer.transformer_blocks.0:1`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ActError, ModelMismatchError
from ..hooks import split_site
from ..transport import Transport

DENOISERS = ("unet", "transformer")
WHERE = ("denoiser", *DENOISERS, "text_encoder", "both")
# Config entries that fix the shapes of a component (present ones are compared on steering).
ARCHITECTURE_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "transformer_layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "num_layers",
    "num_single_layers",
    "joint_attention_dim",
    "pooled_projection_dim",
    "hidden_size",
    "num_hidden_layers",
    "projection_dim",
    "d_model",
    "d_ff",
)


def is_pipeline(obj: Any) -> bool:
    """Whether `obj` looks like a diffusers pipeline (not a module, has a `components` dict)."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def pipeline_modules(pipe: Any) -> dict[str, nn.Module]:
    """The pipeline's torch components by name (tokenizers, schedulers and empty slots left out)."""
    if not is_pipeline(pipe):
        raise ActError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    return {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}


def denoiser_name(pipe: Any) -> str:
    """`"unet"` or `"transformer"`: the component the sampling loop calls at every step."""
    modules = pipeline_modules(pipe)
    for name in DENOISERS:
        if name in modules:
            return name
    raise ActError(
        f"{type(pipe).__name__} has no denoiser: none of {', '.join(DENOISERS)} among its "
        f"components ({', '.join(modules)})"
    )


def component_names(pipe: Any, where: str) -> list[str]:
    """Components that `where` names: the denoiser (`"denoiser"`, `"unet"`, `"transformer"`),
    every text encoder (`"text_encoder"`: `text_encoder`, `text_encoder_2`, ...) or both."""
    if where not in WHERE:
        raise ActError(f"unknown where={where!r}; choose one of {', '.join(WHERE)}")
    modules = pipeline_modules(pipe)
    if where in DENOISERS:
        if where not in modules:
            raise ActError(
                f"{type(pipe).__name__} has no {where!r} component; its denoiser is "
                f"{denoiser_name(pipe)!r}: use where='denoiser'"
            )
        return [where]
    names = [denoiser_name(pipe)] if where in ("denoiser", "both") else []
    if where in ("text_encoder", "both"):
        encoders = sorted(name for name in modules if name.startswith("text_encoder"))
        if not encoders:
            raise ActError(
                f"{type(pipe).__name__} has no text encoder (it has {', '.join(modules)})"
            )
        names += encoders
    return names


def pipeline_root(pipe: Any, names: Sequence[str]) -> nn.ModuleDict:
    """One module over the named components, so that site names are prefixed by component."""
    modules = pipeline_modules(pipe)
    for name in names:
        if name not in modules:
            raise ModelMismatchError(
                f"{type(pipe).__name__} has no component {name!r} (it has {', '.join(modules)})"
            )
    return nn.ModuleDict({name: modules[name] for name in names})


def pipeline_fingerprint(pipe: Any, names: Sequence[str]) -> dict[str, Any]:
    """Pipeline class plus, per component, its class and architecture config (JSON-ready)."""
    modules = pipeline_modules(pipe)
    return {
        "class": type(pipe).__name__,
        "components": {
            name: {"class": type(modules[name]).__name__, "config": _architecture(modules[name])}
            for name in names
        },
    }


def check_pipeline(pipe: Any, transport: Transport) -> None:
    """Raise ModelMismatchError unless the pipeline has the architecture the transport was
    fitted on (same component classes and shape-defining config entries)."""
    fitted = transport.info.get("pipeline")
    if not isinstance(fitted, dict) or not isinstance(fitted.get("components"), dict):
        raise ModelMismatchError(
            f"this transport was fitted on {transport.model_class or 'a torch model'}, not on a "
            "diffusers pipeline (its info has no 'pipeline' entry); steer that model with "
            "act.steer(model, transport)"
        )
    modules = pipeline_modules(pipe)
    here, there = type(pipe).__name__, fitted.get("class")
    unprefixed = [site for site in transport.sites if "." not in split_site(site)[0]]
    if unprefixed:
        raise ModelMismatchError(
            f"site {unprefixed[0]!r} names no pipeline component: a pipeline transport's "
            f"sites start with a component (e.g. 'unet.{unprefixed[0]}')"
        )
    for name, expected in fitted["components"].items():
        if not isinstance(expected, dict) or not isinstance(expected.get("config", {}), dict):
            raise ModelMismatchError(
                f"the transport's info.pipeline.components[{name!r}] is not an object with a "
                "'class' and a 'config'; the file is corrupted or was not written by act"
            )
        module = modules.get(name)
        if module is None:
            raise ModelMismatchError(
                f"the transport steers the {name!r} of a {there}, but this {here} has no "
                f"{name!r} component"
            )
        if type(module).__name__ != expected.get("class"):
            raise ModelMismatchError(
                f"the transport was fitted on a {there} whose {name} is a "
                f"{expected.get('class')}; this {here}'s {name} is a {type(module).__name__}"
            )
        actual = _architecture(module)
        for key, value in (expected.get("config") or {}).items():
            if key in actual and actual[key] != value:
                raise ModelMismatchError(
                    f"{name}.config.{key} is {actual[key]} in this {here} but {value} in the "
                    f"{there} the transport was fitted on; a transport only fits the "
                    "architecture it was fitted on"
                )


def _architecture(module: nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    values = {}
    for key in ARCHITECTURE_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            values[key] = json.loads(json.dumps(value))  # tuples become lists, as in files
    return values


class StepClock:
    """Which step of the sampling schedule a denoiser call belongs to.

    Call `update(args, kwargs)` from a forward pre-hook on the denoiser. It matches the call's
    timestep against `pipe.scheduler.timesteps` (FLUX pipelines also expose it as
    `pipe._current_timestep`; their transformer receives it divided by 1000). Afterwards:
    `index` is the position in the full schedule (None when the timestep is not in it),
    `total` the schedule's length, and `call` counts earlier calls at the same position
    (FLUX's true CFG calls the transformer twice per step, positive prompt first). A new
    schedule (the next pipeline call) starts afresh. Order-2 schedulers that repeat timesteps
    (Heun) count a repeated timestep as a second call of the same step.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.index: int | None = None
        self.total = 0
        self.call = 0
        self._schedule: Any = None
        self._values = torch.empty(0, dtype=torch.float64)

    @property
    def fraction(self) -> float | None:
        """`index / total`: 0 at the first (highest-noise) step; None when unknown."""
        return None if self.index is None else self.index / self.total

    def update(self, args: tuple, kwargs: dict) -> None:
        """Locate the denoiser call with these arguments in the schedule."""
        schedule = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if schedule is not self._schedule:
            self._schedule = schedule
            values = torch.as_tensor([] if schedule is None else schedule)
            self._values = values.detach().to("cpu", torch.float64).flatten()
            self.total = len(self._values)
            self.index = None
        index = self._find(_call_timestep(self.pipe, args, kwargs))
        self.call = self.call + 1 if index is not None and index == self.index else 0
        self.index = index

    def _find(self, value: float | None) -> int | None:
        if value is None or not self.total:
            return None
        for start in dict.fromkeys((self.index or 0, 0)):  # later positions first
            for candidate, tolerance in ((value, 1e-4), (value * 1000, 1e-2)):
                distance = (self._values[start:] - candidate).abs()
                best = int(distance.argmin())
                if distance[best] <= tolerance * max(1.0, abs(candidate)):
                    return start + best
        return None


def _call_timestep(pipe: Any, args: tuple, kwargs: dict) -> float | None:
    value = getattr(pipe, "_current_timestep", None)
    if value is None:
        value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(value, torch.Tensor):
        return float(value.flatten()[0]) if value.numel() else None
    return None if value is None else float(value)
