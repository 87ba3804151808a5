"""Activation Transport (AcT): steer generative models by transporting activations.

Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations"
(arXiv 2410.23054). The core is pure torch: fit per-unit maps from pooled samples
(`fit_transport`), apply them with hooks (`steer`), fold them into weights (`bake`), and
share them as safetensors files (`Transport.save` / `Transport.load`). Front ends: causal
LMs from transformers (`load_causal_lm`, `fit_text`, `generate`) and diffusers pipelines
(`fit_pipeline`, `act.steer(pipe, ...)`).
"""

from .api import steer
from .baking import Baked, bake, bake_deltas
from .collection import collect
from .diffusion import collect_pipeline, fit_pipeline
from .diffusion_steering import PipelineSteering, steer_pipeline
from .errors import ActError, ModelMismatchError, TransportFileError
from .fitting import fit_transport
from .generation import Sampling, generate
from .llm import load_causal_lm
from .recording import Recorder, record
from .samples import Batch, Samples
from .selection import PRESETS, register_preset, select_modules
from .steering import Steering
from .text import collect_text, fit_text
from .transport import ModuleMap, Transport

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActError",
    "Baked",
    "Batch",
    "ModelMismatchError",
    "ModuleMap",
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
