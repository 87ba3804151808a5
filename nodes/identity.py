"""Cheap identities of a MODEL or CLIP, for the collection cache key: plain JSON values that
change whenever the model would compute something else.

A ModelPatcher's identity is its checkpoint file(s) as ComfyUI loaded them (path, size and
modification time, from the patcher's `cached_patcher_init`; symlinks resolved), a fingerprint of its original
weights (names, shapes and dtypes of all, the values of up to `WEIGHT_TENSORS` tensors at
`VALUES_PER_TENSOR` evenly spaced positions; the weights saved before a LoRA was patched in
count, so the identity does not depend on which clone is loaded), and a description of
everything patched onto it: weight patches (LoRAs: keys, strengths and the patch tensors),
object patches, weight wrappers, model options (transformer patches, sampler functions),
wrappers, callbacks and hooks. No full checkpoint is hashed: a few milliseconds per model.

Functions and objects are described by their qualified names and contents (closure cells,
partial arguments, attributes, nn.Module weights), `DEPTH` objects deep; memory addresses never
enter an identity, so it is the same after a restart.

Duck-typed over ComfyUI's objects: nothing here imports ComfyUI.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import os
import re
import types
from typing import Any

import torch
from torch import nn

WEIGHT_TENSORS = 64
VALUES_PER_TENSOR = 256
SMALL_TENSOR = 4096  # tensors up to this many elements are fingerprinted whole
DEPTH = 4
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
PATCHER_FIELDS = (
    "patches",
    "object_patches",
    "weight_wrapper_patches",
    "model_options",
    "wrappers",
    "callbacks",
    "hook_patches",
    "forced_hooks",
)


def model_identity(patcher: Any) -> dict[str, Any]:
    """The identity of a ModelPatcher (a MODEL, or a CLIP's `.patcher`); see the module
    docstring."""
    model = patcher.model
    config = getattr(model, "model_config", None)
    identity = {
        "class": _type_name(model),
        "config": None if config is None else _type_name(config),
        "unet_config": describe(getattr(config, "unet_config", None)),
        "dtype": str(patcher.model_dtype()) if hasattr(patcher, "model_dtype") else None,
        "files": checkpoint_files(patcher),
        "weights": weights_fingerprint(model, _original_weights(patcher)),
    }
    identity.update({name: describe(getattr(patcher, name, None)) for name in PATCHER_FIELDS})
    return identity


def clip_identity(clip: Any) -> dict[str, Any]:
    """The identity of a CLIP: its patcher's, plus the tokenizer and the settings that
    change encoding (CLIP Set Last Layer's `layer_idx`, tokenizer options)."""
    return {
        "patcher": model_identity(clip.patcher),
        "tokenizer": _type_name(clip.tokenizer),
        "layer_idx": describe(getattr(clip, "layer_idx", None)),
        "tokenizer_options": describe(getattr(clip, "tokenizer_options", None)),
    }


def checkpoint_files(patcher: Any) -> list[list[Any]]:
    """[path, size, mtime_ns] of each file the patcher was loaded from, where ComfyUI's loader
    recorded it (`cached_patcher_init`); [] for a model built in memory."""
    init = getattr(patcher, "cached_patcher_init", None)
    if not init or len(init) < 2 or not init[1]:
        return []
    first = init[1][0]
    paths = first if isinstance(first, list | tuple) else [first]
    files = []
    for path in paths:
        if isinstance(path, str | os.PathLike) and os.path.isfile(path):
            stat = os.stat(path)
            files.append([os.path.realpath(path), stat.st_size, stat.st_mtime_ns])
    return files


def weights_fingerprint(model: nn.Module, originals: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, shape and dtype and over sampled values of up to
    `WEIGHT_TENSORS` evenly spaced tensors; `originals` replace tensors patched in place."""
    state = model.state_dict(keep_vars=True)
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    names = list(state)
    step = max(1, math.ceil(len(names) / WEIGHT_TENSORS))
    for name in names[::step]:
        digest.update(_values(originals.get(name, state[name])))
    return digest.hexdigest()


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """dtype, shape and a SHA-256 of the values (all of a small tensor, else evenly spaced
    ones)."""
    return f"{tensor.dtype}{tuple(tensor.shape)}:{hashlib.sha256(_values(tensor)).hexdigest()}"


def describe(value: Any, depth: int = DEPTH) -> Any:
    """A plain JSON value standing for `value`: numbers and strings as they are, tensors by
    `tensor_fingerprint`, containers item by item, nn.Modules by type and weights, functions
    by qualified name with their closure, defaults and bound object, other objects by type
    and attributes; containers count as their items' level, and objects or functions
    nested more than `depth` levels deep are only named by type."""
    return _describe(value, depth, set())


def _describe(value: Any, depth: int, seen: set[int]) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, torch.Tensor):
        return tensor_fingerprint(value)
    if isinstance(value, torch.dtype | torch.device | enum.Enum):
        return str(value)
    if depth <= 0 or id(value) in seen:
        return _type_name(value)
    seen = seen | {id(value)}

    def same(item: Any) -> Any:  # inside a container: the same level
        return _describe(item, depth, seen)

    def inner(item: Any) -> Any:  # inside a function or object: one level down
        return _describe(item, depth - 1, seen)

    if isinstance(value, dict):
        return [[same(key), same(item)] for key, item in value.items()]
    if isinstance(value, list | tuple):
        return [same(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted((same(item) for item in value), key=repr)
    if isinstance(value, nn.Module):
        return {"module": _type_name(value), "weights": weights_fingerprint(value, {})}
    if isinstance(value, functools.partial):
        return {
            "partial": inner(value.func),
            "args": inner(value.args),
            "kw": inner(value.keywords),
        }
    if isinstance(value, types.MethodType):
        return {"method": _qualified(value.__func__), "self": inner(value.__self__)}
    if isinstance(value, types.FunctionType):
        cells = [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
        return {
            "function": _qualified(value),
            "closure": inner(cells),
            "defaults": inner(value.__defaults__),
        }
    if isinstance(value, types.BuiltinFunctionType | type):
        return _qualified(value)
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return {"object": _type_name(value), "fields": inner(fields)}
    return _ADDRESS.sub("", repr(value))


def _original_weights(patcher: Any) -> dict[str, torch.Tensor]:
    """The weights a patcher saved before patching them in place (LoRAs, hooks)."""
    originals = {
        key: saved.weight for key, saved in (getattr(patcher, "backup", None) or {}).items()
    }
    for key, saved in (getattr(patcher, "hook_backup", None) or {}).items():
        originals.setdefault(key, saved[0])
    return originals


def _values(tensor: torch.Tensor) -> bytes:
    """Sampled values of `tensor` as bytes (float64); b"" for a tensor without data."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return b""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SMALL_TENSOR:
        flat = flat[torch.linspace(0, flat.numel() - 1, VALUES_PER_TENSOR).long().to(flat.device)]
    return flat.to("cpu", torch.float64).numpy().tobytes()


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _qualified(value: Any) -> str:
    return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"


def _type_name(value: Any) -> str:
    return _qualified(type(value))
