"""Exporting a steered causal LM for llama.cpp: a GGUF checkpoint with the transport folded
into its weights, and a control vector (`llama-cli --control-vector FILE`) for Mean-AcT on
block outputs.

**Checkpoint.** The export starts from the GGUF file the model was loaded from: its metadata
and every tensor the transport does not touch are copied as they are (tensor type "keep") or
converted to float32 / float16, and the folded weights are written in float32 (a quantized
weight cannot be re-quantized without changing it). A Linear layer without a bias gets one as
a new tensor (`blk.N.attn_output.bias`), which llama.cpp's Llama graph reads when present.
Each replaced tensor is first checked against the model's own weight, bit for bit, so a GGUF
of another model, or a tensor llama.cpp stores rearranged (Llama's query and key weights are
permuted for its rotary embedding), is refused rather than overwritten wrongly.

**Control vector.** llama.cpp adds the tensor `direction.N` to the output of decoder layer N
(N >= 1; the first layer's output cannot be steered), for every token: exactly a map with
scale 1 and support "all" on a block output, which Mean-AcT fits. The file holds the shifts at
the export's strength; `--control-vector-scaled FILE S` multiplies them by S.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..baking import bake_deltas
from ..errors import ActError
from ..export import check_target, refuse_bounds
from ..files import atomic_file
from ..hooks import check_fingerprint, resolve_module, split_site
from ..maps import checked_strength
from ..transport import Transport
from .export import REMEDY, zero_biases

GGUF_TYPES = ("keep", "f32", "f16")
CONTROL_VECTOR_ARCH = "controlvector"
CONTROL_VECTOR_REMEDY = (
    "fit Mean-AcT on block outputs with support 'all' (python -m act fit-text ... "
    "--layers block-outputs --method mean --support all)"
)
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
_INTEGER_TYPES = {
    gguf.GGMLQuantizationType.I8,
    gguf.GGMLQuantizationType.I16,
    gguf.GGMLQuantizationType.I32,
    gguf.GGMLQuantizationType.I64,
}
_BLOCK_OUTPUT = re.compile(r"(?P<blocks>.+)\.(?P<index>\d+)")


@dataclass(frozen=True)
class GgufExport:
    """What `export_gguf` or `export_control_vector` wrote."""

    path: Path
    strength: float
    tensors: list[str]
    added: list[str]

    def summary(self) -> str:
        """One line for people."""
        added = f" ({len(self.added)} of them new biases)" if self.added else ""
        return (
            f"wrote {self.path}: {len(self.tensors)} tensors{added} at strength {self.strength:g}"
        )


def export_gguf(
    model: nn.Module,
    transport: Transport,
    source: str | Path,
    out: str | Path,
    strength: float = 1.0,
    *,
    tensor_type: str = "keep",
    overwrite: bool = False,
) -> GgufExport:
    """Write the GGUF `source` with `transport` folded into its weights at `strength`.

    Args:
        model: the causal LM loaded from `source` (e.g. `act.text.load_causal_lm(path)`);
            it is not changed.
        transport: maps with support "all" on Linear or LayerNorm outputs.
        source: the GGUF file the model was loaded from.
        out: the .gguf file to write (atomically).
        strength: as in `act.steer`.
        tensor_type: "keep" (untouched tensors copied as they are, quantized or not), "f32"
            (every tensor float32: llama.cpp then computes what the transformers model does)
            or "f16" (matrices float16, vectors float32).
        overwrite: replace an existing file.

    Raises:
        ActError: a bad strength or tensor type; `out` exists without `overwrite` or cannot
            be written; `source` is not a GGUF or is not the model's; the transport has support
            bounds, was fitted on another model, or hooks a module with no tensor of its own
            in the GGUF. Nothing is written then.
    """
    strength = checked_strength(strength)
    if tensor_type not in GGUF_TYPES:
        raise ActError(f"unknown GGUF tensor type {tensor_type!r}; choose one of {GGUF_TYPES}")
    target = check_target(out, overwrite, suffix=".gguf")
    refuse_bounds(transport, REMEDY)
    if transport.module_params:
        check_fingerprint(model, transport.module_params, transport.model_class)
    reader = read_gguf(source)
    names = _tensor_names(reader)
    originals = {tensor.name: tensor for tensor in reader.tensors}
    modules = [resolve_module(model, name) for name in _site_modules(transport)]
    with zero_biases(modules):
        deltas = bake_deltas(model, transport, strength)
        replaced: dict[str, np.ndarray] = {}
        for parameter, delta in deltas.items():
            old = model.get_parameter(parameter).detach()
            name = _gguf_name(names, parameter)
            if name in originals:
                _check_same(originals[name], old, parameter)
            elif not torch.all(old == 0):
                raise ActError(f"the GGUF has no tensor {name!r} for {parameter!r}")
            replaced[name] = (old.float() + delta).cpu().numpy()
    added = [name for name in replaced if name not in originals]
    _write_checkpoint(reader, replaced, target, tensor_type)
    return GgufExport(target, strength, sorted(replaced), added)


def export_control_vector(
    model: nn.Module,
    transport: Transport,
    out: str | Path,
    strength: float = 1.0,
    *,
    overwrite: bool = False,
) -> GgufExport:
    """Write `transport` at `strength` as a llama.cpp control vector (a GGUF file).

    Args:
        model: the causal LM the transport was fitted on (read, not changed).
        transport: maps with scale 1 (Mean-AcT) and support "all" on decoder layer outputs
            (`model.layers.N`, N >= 1).
        out: the .gguf file to write (atomically).
        strength: as in `act.steer`; llama.cpp's `--control-vector-scaled` scales it further.
        overwrite: replace an existing file.

    Raises:
        ActError: a bad strength; `out` exists without `overwrite` or cannot be written; a map
            is not a constant shift of a decoder layer's output after the first (named, with
            the reason); the transport was fitted on another model. Nothing is written then.
    """
    strength = checked_strength(strength)
    target = check_target(out, overwrite, suffix=".gguf")
    refuse_bounds(transport, CONTROL_VECTOR_REMEDY)
    if transport.module_params:
        check_fingerprint(model, transport.module_params, transport.model_class)
    width = getattr(model.config, "hidden_size", None)
    directions: dict[int, np.ndarray] = {}
    for site, module_map in transport.maps.items():
        layer = _block_index(model, site)
        coefficients = module_map.coefficients(strength)
        scaled = int(torch.count_nonzero(coefficients.scale != 1))
        if scaled:
            raise ActError(
                f"module {site!r}: the map scales {scaled} of {module_map.units} units, and a "
                f"control vector can only add a constant; {CONTROL_VECTOR_REMEDY}"
            )
        if module_map.units != width:
            raise ActError(
                f"module {site!r} has {module_map.units} units, the model's width is {width}"
            )
        directions[layer] = coefficients.shift.float().cpu().numpy()
    hint = str(getattr(model.config, "model_type", "") or "")
    _write_control_vector(directions, hint, target)
    names = [f"direction.{layer}" for layer in sorted(directions)]
    return GgufExport(target, strength, names, [])


def read_gguf(path: str | Path) -> gguf.GGUFReader:
    """A reader of the GGUF file `path`, or an ActError saying why it cannot be read.

    Readers are kept for the last files read while they are unchanged on disk (parsing a
    tokenizer's metadata takes seconds), so exporting several strengths reads the file once.
    """
    try:
        info = Path(path).stat()
        return _reader(str(Path(path).resolve()), info.st_mtime_ns, info.st_size)
    except (OSError, ValueError) as error:
        raise ActError(f"cannot read {str(path)!r} as a GGUF file: {error}") from None


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _site_modules(transport: Transport) -> list[str]:
    return list(dict.fromkeys(split_site(site)[0] for site in transport.sites))


def _tensor_names(reader: gguf.GGUFReader) -> gguf.TensorNameMap:
    """gguf's map from transformers parameter names to the GGUF's tensor names."""
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    by_name = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise ActError(f"the GGUF's architecture {arch!r} is not one the gguf package knows")
    blocks = _field(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    return gguf.get_tensor_name_map(by_name[arch], int(blocks))


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise ActError(f"the GGUF has no metadata {key!r}")
    return field.contents()


def _gguf_name(names: gguf.TensorNameMap, parameter: str) -> str:
    name = names.get_name(parameter, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ActError(
            f"{parameter!r} has no tensor name in llama.cpp's naming for this architecture; "
            "choose other layers, or export a transformers folder (python -m act export "
            "--format folder)"
        )
    return name


def _check_same(tensor: Any, parameter: torch.Tensor, name: str) -> None:
    """Raise unless the GGUF tensor holds exactly the model's `parameter`."""
    stored = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    same = stored.shape == parameter.shape and torch.equal(
        stored.to(parameter.dtype), parameter.cpu()
    )
    if not same:
        raise ActError(
            f"tensor {tensor.name!r} of the GGUF does not hold {name!r} as the model has it: "
            "the GGUF is another model's, or llama.cpp stores this tensor rearranged (Llama's "
            "query and key weights); load the model from this GGUF, or choose other layers "
            "(attention outputs o_proj, MLP down_proj)"
        )


def _write_checkpoint(
    reader: gguf.GGUFReader, replaced: dict[str, np.ndarray], target: Path, tensor_type: str
) -> None:
    """Copy `reader`'s metadata and tensors to `target`, `replaced` (by name) written anew
    and new names (biases) right after their weight."""
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    writes: list[Callable[[gguf.GGUFWriter], None]] = []
    try:
        with atomic_file(target) as temporary:
            writer = gguf.GGUFWriter(temporary, arch)
            _copy_metadata(reader, writer, tensor_type)
            present = {tensor.name for tensor in reader.tensors}
            for tensor in reader.tensors:
                writes.append(_add_tensor(writer, tensor, replaced, tensor_type, reader))
                bias = tensor.name.removesuffix(".weight") + ".bias"
                if tensor.name.endswith(".weight") and bias in replaced and bias not in present:
                    writes.append(_add_array(writer, bias, replaced[bias]))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for write in writes:
                write(writer)
            writer.close()
    except OSError as error:
        raise ActError(f"cannot write {str(target)!r}: {error.strerror or error}") from None


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, tensor_type: str) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE and tensor_type in _FILE_TYPES:
            value = int(_FILE_TYPES[tensor_type])
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)


def _add_tensor(
    writer: gguf.GGUFWriter,
    tensor: Any,
    replaced: dict[str, np.ndarray],
    tensor_type: str,
    reader: gguf.GGUFReader,
) -> Callable[[gguf.GGUFWriter], None]:
    """Register one of the source's tensors with `writer`; returns the call writing its data."""
    if tensor.name in replaced:
        return _add_array(writer, tensor.name, replaced[tensor.name])
    converted = _converted(tensor, tensor_type)
    if converted is not None:
        return _add_array(writer, tensor.name, converted)
    data = tensor.data
    writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    return lambda w: w.write_tensor_data(data, tensor_endianess=reader.endianess)


def _converted(tensor: Any, tensor_type: str) -> np.ndarray | None:
    """The tensor's values in the export's float type, or None to copy it as it is."""
    if tensor_type == "keep" or tensor.tensor_type in _INTEGER_TYPES:
        return None
    wanted = np.float16 if tensor_type == "f16" and len(tensor.shape) > 1 else np.float32
    if tensor.tensor_type == gguf.GGMLQuantizationType.F32 and wanted == np.float32:
        return None
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return values.astype(wanted)


def _add_array(
    writer: gguf.GGUFWriter, name: str, values: np.ndarray
) -> Callable[[gguf.GGUFWriter], None]:
    writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes)
    return lambda w: w.write_tensor_data(values)


def _block_index(model: nn.Module, site: str) -> int:
    """N for a site that is the output of decoder layer N >= 1, else an ActError why not."""
    name, index = split_site(site)
    match = _BLOCK_OUTPUT.fullmatch(name)
    layers = getattr(model.config, "num_hidden_layers", None)
    blocks = model.get_submodule(match["blocks"]) if match else None
    if index not in (None, 0) or not isinstance(blocks, nn.ModuleList) or len(blocks) != layers:
        raise ActError(
            f"module {site!r} is not the output of a decoder layer, which is all a control "
            f"vector steers; {CONTROL_VECTOR_REMEDY}"
        )
    layer = int(match["index"])
    if layer == 0:
        raise ActError(
            f"module {site!r}: llama.cpp's control vectors cannot steer the first layer's "
            "output; leave it out (the preset block-outputs does)"
        )
    return layer


def _write_control_vector(directions: dict[int, np.ndarray], hint: str, target: Path) -> None:
    try:
        with atomic_file(target) as temporary:
            writer = gguf.GGUFWriter(temporary, CONTROL_VECTOR_ARCH)
            writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", hint)
            writer.add_int32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(directions))
            for layer in sorted(directions):
                writer.add_tensor(f"direction.{layer}", directions[layer])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as error:
        raise ActError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
