"""Activation Transport (AcT): steer generative models by transporting activations.

Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations"
(arXiv 2410.23054). The core, the top-level modules of this package, is pure torch: fit
per-unit maps from pooled samples (`fit_transport`) or jointly through the model
(`fit_end_to_end`), apply them with hooks (`steer`), fold them into weights (`bake`), and share
them as safetensors files (`Transport.save` / `Transport.load`). Two front ends are packages
around it: `act.text` for causal LMs from transformers (`load_causal_lm`, `fit_text`,
`generate`) and `act.diffusers` for diffusers pipelines (`fit_pipeline`,
`act.steer(pipe, ...)`).

Imports point inward: the front ends use the core, never each other; the core imports only
torch, numpy and safetensors (never transformers, diffusers, or the front ends); nothing in
`act` imports ComfyUI. This module is the public surface over all of them.
"""

from typing import Any

from torch import nn

from .baking import Baked, bake, bake_deltas
from .collection import collect
from .diffusers import PipelineSteering, collect_pipeline, fit_pipeline, steer_pipeline
from .diffusers.anatomy import is_pipeline
from .end_to_end import EndToEnd, fit_end_to_end
from .errors import ActError, ModelMismatchError, ModulesNeverRanError, TransportFileError
from .export import LoraExport, export_lora
from .fitting import fit_transport
from .maps import ModuleMap
from .recording import Recorder, record
from .samples import Batch, Samples
from .selection import PRESETS, register_preset, select_modules
from .steering import Steering
from .steering import steer as steer_module
from .text import Sampling, collect_text, fit_text, generate, load_causal_lm
from .transport import Transport

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActError",
    "Baked",
    "Batch",
    "EndToEnd",
    "LoraExport",
    "ModelMismatchError",
    "ModuleMap",
    "ModulesNeverRanError",
    "PipelineSteering",
    "Recorder",
    "Samples",
    "Sampling",
    "Steering",
    "Transport",
    "TransportFileError",
    "bake",
    "bake_deltas",
    "collect",
    "collect_pipeline",
    "collect_text",
    "export_lora",
    "fit_end_to_end",
    "fit_pipeline",
    "fit_text",
    "fit_transport",
    "generate",
    "load_causal_lm",
    "record",
    "register_preset",
    "select_modules",
    "steer",
    "steer_pipeline",
]


def steer(
    model: Any, transport: Transport, strength: float = 1.0, **options: Any
) -> Steering | PipelineSteering:
    """Steer a torch module or a diffusers pipeline with `transport`; use it with `with`.

    A module: see `act.steering.steer` (options `active`, `rows`). A pipeline: every
    component the transport names; options `steps=(start, end)` (fractions of the sampling
    schedule) and `cond_only` (see `act.diffusers.steering.steer_pipeline`).
    """
    if isinstance(model, nn.Module):
        return steer_module(model, transport, strength, **options)
    if is_pipeline(model):
        return steer_pipeline(model, transport, strength, **options)
    raise ActError(
        f"cannot steer a {type(model).__name__}: pass a torch module or a diffusers pipeline"
    )
