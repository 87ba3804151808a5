"""Transport files: safetensors tensors plus a JSON header, validated on load.

This module owns the layout of the bytes: it writes and reads per-site `ModuleMap`s and the
header fields of a transport (the keyword arguments of `act.Transport` besides its maps),
and knows nothing of the `Transport` class, which calls it (`Transport.save` / `.load`).

Layout: for every site, six float32 tensors of shape (units,) named `<site>/omega`,
`<site>/beta`, `<site>/source_lo`, `<site>/source_hi`, `<site>/target_lo`,
`<site>/target_hi`; the safetensors metadata entry "act" holds the JSON header (format and
version, method, support, modules with unit counts and parameter shapes, model class, sample
counts, causal flag, default strength, free-form info). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import ActError, TransportFileError
from .maps import METHODS, ModuleMap, Support

FORMAT = "act-transport"
FORMAT_VERSION = 1
FIELDS = ("omega", "beta", "source_lo", "source_hi", "target_lo", "target_hi")


def transport_to_bytes(maps: Mapping[str, ModuleMap], fields: Mapping[str, Any]) -> bytes:
    """Serialise maps and header fields to the bytes of a safetensors file.

    Args:
        maps: site -> map, in application order.
        fields: `method`, `support`, `source_samples`, `target_samples`, `model_class`,
            `module_params`, `causal`, `default_strength` and `info`, as `act.Transport` has them.
    """
    params = fields["module_params"]
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": fields["method"],
        "support": fields["support"],
        "modules": [
            {"site": site, "units": m.units, "params": params.get(site, {})}
            for site, m in maps.items()
        ],
        "model_class": fields["model_class"],
        "source_samples": fields["source_samples"],
        "target_samples": fields["target_samples"],
        "causal": fields["causal"],
        "default_strength": fields["default_strength"],
        "info": fields["info"],
    }
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ActError(f"transport info must be JSON-serialisable: {error}") from None
    tensors = {
        f"{site}/{name}": getattr(m, name).detach().to("cpu", torch.float32).contiguous()
        for site, m in maps.items()
        for name in FIELDS
    }
    return save_tensors(tensors, metadata={"act": text})


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write a transport file's bytes atomically (a partial file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a transport file.

    Raises:
        TransportFileError: the file cannot be read.
    """
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as error:
        raise TransportFileError(
            f"cannot read transport file {str(path)!r}: {error.strerror}"
        ) from None


def transport_from_bytes(
    data: bytes, name: str = "<bytes>"
) -> tuple[dict[str, ModuleMap], dict[str, Any]]:
    """Parse and validate the bytes of a transport file.

    Returns:
        The maps (site -> map, in application order) and the header fields, the keyword
        arguments of `act.Transport` besides its maps.

    Raises:
        TransportFileError: the bytes are truncated, malformed or inconsistent (`name`, e.g.
            the file's path, is named in the message).
    """
    header = _read_header(data, name)
    try:
        tensors = load_tensors(data)
    except Exception as error:  # safetensors raises its own error types
        raise TransportFileError(f"{name} is not a valid safetensors file: {error}") from None
    return _build(header, tensors, name)


def _read_header(data: bytes, name: str) -> dict[str, Any]:
    if len(data) < 8:
        raise TransportFileError(f"{name} is truncated or empty ({len(data)} bytes)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise TransportFileError(f"{name} is truncated: its header claims {length} bytes")
    try:
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
        header = json.loads(metadata["act"])
    except (ValueError, AttributeError, KeyError, TypeError):
        raise TransportFileError(
            f"{name} has no AcT header; it is not a transport file (or it is corrupted)"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TransportFileError(
            f"{name} is not an AcT transport file (format {header.get('format')!r})"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise TransportFileError(f"{name}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TransportFileError(
            f"{name} uses format version {version}; this library reads up to {FORMAT_VERSION}: "
            "upgrade the library"
        )
    return header


def _build(
    header: dict[str, Any], tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, ModuleMap], dict[str, Any]]:
    def fail(problem: str) -> TransportFileError:
        return TransportFileError(f"{name}: {problem}")

    method, support = header.get("method"), header.get("support")
    if method not in METHODS:
        raise fail(f"unknown method {method!r}")
    try:
        Support.parse(support)
    except ActError:
        raise fail(f"unknown support {support!r}") from None
    modules = header.get("modules")
    if not isinstance(modules, list) or not modules:
        raise fail("the header lists no modules")
    maps: dict[str, ModuleMap] = {}
    params: dict[str, dict[str, list[int]]] = {}
    for entry in modules:
        site, units = _module_entry(entry, fail)
        if site in maps:
            raise fail(f"module {site!r} is listed twice")
        maps[site] = _module_map(site, units, tensors, fail)
        if entry.get("params"):
            params[site] = entry["params"]
    expected = {f"{site}/{field}" for site in maps for field in FIELDS}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise fail(f"tensors not described by the header: {extra[:5]}")
    counts = [header.get("source_samples"), header.get("target_samples")]
    if not all(isinstance(c, int) and c >= 1 for c in counts):
        raise fail(f"invalid sample counts {counts}")
    strength = header.get("default_strength", 1.0)
    if not isinstance(strength, int | float) or not math.isfinite(strength):
        raise fail(f"invalid default_strength {strength!r}")
    info = header.get("info", {})
    model_class = header.get("model_class")
    if not isinstance(info, dict) or not isinstance(model_class, str | None):
        raise fail("invalid info or model_class field")
    fields = {
        "method": method,
        "support": support,
        "source_samples": counts[0],
        "target_samples": counts[1],
        "model_class": model_class,
        "module_params": params,
        "causal": bool(header.get("causal", False)),
        "default_strength": float(strength),
        "info": info,
    }
    return maps, fields


def _module_entry(entry: Any, fail) -> tuple[str, int]:
    if not isinstance(entry, dict):
        raise fail(f"invalid module entry {entry!r}")
    site, units = entry.get("site"), entry.get("units")
    if not isinstance(site, str) or not site:
        raise fail(f"invalid module name {site!r}")
    if not isinstance(units, int) or units < 1:
        raise fail(f"module {site!r}: invalid unit count {units!r}")
    shapes = entry.get("params", {})
    if not isinstance(shapes, dict) or not all(
        isinstance(s, list) and all(isinstance(d, int) for d in s) for s in shapes.values()
    ):
        raise fail(f"module {site!r}: invalid parameter shapes {shapes!r}")
    return site, units


def _module_map(site: str, units: int, tensors: dict[str, torch.Tensor], fail) -> ModuleMap:
    values = {}
    for field in FIELDS:
        tensor = tensors.get(f"{site}/{field}")
        if tensor is None:
            raise fail(f"module {site!r} lacks its {field!r} tensor")
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != (units,):
            raise fail(
                f"module {site!r}: {field!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected float32 ({units},)"
            )
        if torch.isnan(tensor).any():
            raise fail(f"module {site!r}: {field!r} contains NaN")
        values[field] = tensor
    if not (torch.isfinite(values["omega"]).all() and torch.isfinite(values["beta"]).all()):
        raise fail(f"module {site!r}: omega/beta contain infinite values")
    for side in ("source", "target"):
        if (values[f"{side}_lo"] > values[f"{side}_hi"]).any():
            raise fail(f"module {site!r}: {side} support has lower bounds above upper bounds")
    return ModuleMap(**values)
