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
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import ActError, TransportFileError
from .maps import TRANSPORT_METHODS, ModuleMap, Support

FORMAT = "act-transport"
FORMAT_VERSION = 1
FIELDS = ("omega", "beta", "source_lo", "source_hi", "target_lo", "target_hi")
# safetensors refuses headers over 100 MB; keep room for the tensors' entries.
MAX_HEADER_BYTES = 64_000_000


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
    if len(text) > MAX_HEADER_BYTES:
        info = len(json.dumps(fields["info"]))
        raise ActError(
            f"the transport's header is {len(text) / 1e6:.1f} MB of JSON ({info / 1e6:.1f} MB "
            f"of it info); a transport file holds at most {MAX_HEADER_BYTES / 1e6:.0f} MB: keep "
            "prompts and descriptions in info, not data"
        )
    tensors = {  # clones: fields that share one tensor are stored apart
        f"{site}/{name}": getattr(m, name).detach().to("cpu", torch.float32).clone()
        for site, m in maps.items()
        for name in FIELDS
    }
    return save_tensors(tensors, metadata={"act": text})


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
    if len(data) > 8 and data[8:9] != b"{":
        raise TransportFileError(
            f"{name} is not a safetensors transport file (it does not start with a "
            "safetensors header)"
        )
    if length > len(data) - 8:
        raise TransportFileError(
            f"{name} is truncated: its header claims {length} bytes, the file has "
            f"{len(data) - 8} after the length"
        )
    try:
        metadata = _json(data[8 : 8 + length], name).get("__metadata__") or {}
        header = _json(metadata["act"], name)
    except (AttributeError, KeyError, TypeError):
        raise TransportFileError(
            f"{name} has no AcT header; it is not a transport file (or it is corrupted)"
        ) from None
    if not isinstance(header, dict):
        raise TransportFileError(
            f"{name}: the AcT header is a JSON {type(header).__name__}, not an object; it is "
            "not a transport file (or it is corrupted)"
        )
    if header.get("format") != FORMAT:
        raise TransportFileError(
            f"{name} is not an AcT transport file (format {header.get('format')!r})"
        )
    version = header.get("format_version")
    if not _is_int(version) or version < 1:
        raise TransportFileError(f"{name}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise TransportFileError(
            f"{name} uses format version {version}; this library reads up to {FORMAT_VERSION}: "
            "upgrade the library"
        )
    return header


def _json(text: bytes | str, name: str) -> Any:
    """Parsed JSON, or a TransportFileError for malformed or absurdly nested text."""
    try:
        return json.loads(text)
    except RecursionError:
        raise TransportFileError(f"{name}: its JSON header is nested too deeply") from None
    except ValueError:
        raise TransportFileError(f"{name}: its header is not valid JSON (corrupted?)") from None


def _is_int(value: Any) -> bool:
    """An integer and not a bool (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _build(
    header: dict[str, Any], tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, ModuleMap], dict[str, Any]]:
    def fail(problem: str) -> TransportFileError:
        return TransportFileError(f"{name}: {problem}")

    method, support = header.get("method"), header.get("support")
    if method not in TRANSPORT_METHODS:
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
    if not all(_is_int(c) and c >= 1 for c in counts):
        raise fail(f"invalid sample counts {counts}")
    strength = header.get("default_strength", 1.0)
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise fail(f"invalid default_strength {strength!r}: it must be a number")
    try:
        for module_map in maps.values():
            module_map.coefficients(strength)
    except ActError as error:
        raise fail(f"invalid default_strength {strength!r}: {error}") from None
    causal = header.get("causal", False)
    if not isinstance(causal, bool):
        raise fail(f"invalid causal flag {causal!r}: it must be true or false")
    info = header.get("info", {})
    if not isinstance(info, dict):
        raise fail(f"invalid info field: a JSON {type(info).__name__}, not an object")
    model_class = header.get("model_class")
    if not isinstance(model_class, str | None):
        raise fail(f"invalid model_class {model_class!r}: it must be a string or null")
    fields = {
        "method": method,
        "support": support,
        "source_samples": counts[0],
        "target_samples": counts[1],
        "model_class": model_class,
        "module_params": params,
        "causal": causal,
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
    if not _is_int(units) or units < 1:
        raise fail(f"module {site!r}: invalid unit count {units!r}")
    shapes = entry.get("params", {})
    if not isinstance(shapes, dict) or not all(
        isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in shapes.values()
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
        values[field] = tensor
    for side in ("source", "target"):
        if (values[f"{side}_lo"] > values[f"{side}_hi"]).any():
            raise fail(f"module {site!r}: {side} support has lower bounds above upper bounds")
    try:
        return ModuleMap(**values)  # checks NaN, infinite and overflowing coefficients
    except ActError as error:
        raise fail(f"module {site!r}: {error}") from None
