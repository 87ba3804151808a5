"""Activation Transport (AcT): steer generative models by transporting activations.

Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations"
(arXiv 2410.23054). The core is pure torch: fit per-unit maps from pooled samples
(`fit_transport`), apply them with hooks (`steer`), fold them into weights (`bake`), and
share them as safetensors files (`Transport.save` / `Transport.load`).
"""

from act.baking import Baked, bake, bake_deltas
from act.collection import collect
from act.errors import ActError, ModelMismatchError, TransportFileError
from act.fitting import fit_transport
from act.recording import Recorder, record
from act.samples import Batch, Samples
from act.selection import PRESETS, register_preset, select_modules
from act.steering import Steering, steer
from act.transport import ModuleMap, Transport

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActError",
    "Baked",
    "Batch",
    "ModelMismatchError",
    "ModuleMap",
    "Recorder",
    "Samples",
    "Steering",
    "Transport",
    "TransportFileError",
    "bake",
    "bake_deltas",
    "collect",
    "fit_transport",
    "record",
    "register_preset",
    "select_modules",
    "steer",
]
