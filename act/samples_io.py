"""Sample files: collected `Samples` as safetensors tensors plus a JSON header.

Layout: every site's samples as float32 tensors `source/<site>` and `target/<site>` of shape
(N, D); with causal collection, the transport fitted while collecting as the bytes of its
own transport file (a uint8 tensor `fitted`, see `act.io`); the safetensors metadata entry
"act-samples" holds the JSON header (format and version, sites in order, model class,
module parameter shapes, causal method and support, pooling, free-form info). Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import ActError
from .recording import Pooling
from .samples import LABELS, Samples
from .transport import Transport

FORMAT = "act-samples"
FORMAT_VERSION = 1
FITTED = "fitted"


def samples_to_bytes(samples: Samples) -> bytes:
    """The bytes of a samples file (see the module docstring).

    Raises:
        ActError: the info is not JSON-serialisable, or source and target name other sites.
    """
    if list(samples.source) != list(samples.target):
        raise ActError("samples name different sites for source and target; cannot save them")
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sites": samples.sites,
        "model_class": samples.model_class,
        "module_params": samples.module_params,
        "causal": list(samples.causal) if samples.causal else None,
        "pooling": {"kind": samples.pooling.kind, "max_tokens": samples.pooling.max_tokens},
        "info": samples.info,
    }
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ActError(f"samples info must be JSON-serialisable: {error}") from None
    tensors = {
        f"{label}/{site}": values.detach().to("cpu", torch.float32).contiguous()
        for label in LABELS
        for site, values in getattr(samples, label).items()
    }
    if samples.fitted is not None:
        tensors[FITTED] = torch.frombuffer(bytearray(samples.fitted.to_bytes()), dtype=torch.uint8)
    return save_tensors(tensors, metadata={FORMAT: text})


def samples_from_bytes(data: bytes, name: str = "<bytes>") -> Samples:
    """Parse and validate the bytes of a samples file; `name` appears in errors.

    Raises:
        ActError: the bytes are not a samples file of this format, or are inconsistent.
    """
    try:
        tensors = load_tensors(data)
        header = json.loads(_metadata(data)[FORMAT])
    except Exception as error:  # safetensors and json raise their own error types
        raise ActError(f"{name} is not a valid samples file: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ActError(f"{name} is not an AcT samples file")
    if header.get("format_version") != FORMAT_VERSION:
        raise ActError(
            f"{name} has samples format version {header.get('format_version')!r}; this "
            f"library reads version {FORMAT_VERSION}"
        )
    sites = header.get("sites")
    if not isinstance(sites, list) or not all(isinstance(site, str) for site in sites):
        raise ActError(f"{name}: invalid site list {sites!r}")
    sides = {label: {} for label in LABELS}
    for label in LABELS:
        for site in sites:
            values = tensors.get(f"{label}/{site}")
            if values is None or values.dtype != torch.float32 or values.ndim != 2:
                raise ActError(f"{name}: the {label} samples of {site!r} are missing or invalid")
            sides[label][site] = values
    expected = {f"{label}/{site}" for label in LABELS for site in sites} | {FITTED}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ActError(f"{name}: tensors not described by the header: {extra[:5]}")
    fitted = tensors.get(FITTED)
    causal = header.get("causal")
    pooling = header.get("pooling")
    if not isinstance(pooling, dict):
        raise ActError(f"{name}: invalid pooling {pooling!r}")
    return Samples(
        sides["source"],
        sides["target"],
        model_class=header.get("model_class"),
        module_params=header.get("module_params") or {},
        causal=tuple(causal) if causal else None,
        info=header.get("info") or {},
        fitted=None if fitted is None else Transport.from_bytes(fitted.numpy().tobytes(), name),
        pooling=Pooling(pooling.get("kind", ""), pooling.get("max_tokens", 0)),
    )


def _metadata(data: bytes) -> dict[str, Any]:
    """The safetensors metadata of `data`."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]
