"""GGUF exports for llama.cpp, on the built-in SmolLM2 (a Q4_1 GGUF): a checkpoint with the
transport folded in, and a control vector for Mean-AcT on block outputs.

What llama.cpp itself makes of the files is checked in tests/test_llama_cpp.py, which needs a
llama.cpp build; here the files are read back with the gguf package and checked against the
closed form of the maps, and the control vector's meaning (llama.cpp adds `direction.N` to the
output of decoder layer N) is replayed with hooks.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from helpers import random_map
from test_export import _mean_map, _transport

from act import ActError, ModelMismatchError, Transport, steer
from act.text import encode, load_causal_lm
from act.text.cli import main
from act.text.gguf_export import export_control_vector, export_gguf
from act.text.models import smollm2_gguf

O_PROJ_LAYERS = (15, 16, 29)
BLOCK_LAYERS = (3, 4, 5, 6)
PROMPTS = ["The sea was calm that", "She finished reading the"]


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2")


@pytest.fixture(scope="module")
def source():
    return gguf.GGUFReader(str(smollm2_gguf()))


def _o_proj(model, layers=O_PROJ_LAYERS, support="all", site="o_proj") -> Transport:
    maps = {
        f"model.layers.{i}.self_attn.{site}": random_map(576, bounded=support != "all", seed=i)
        for i in layers
    }
    return _transport(model, maps, support)


def _blocks(model, layers=BLOCK_LAYERS, mean=True) -> Transport:
    maps = {f"model.layers.{i}": _mean_map(576, i) if mean else random_map(576) for i in layers}
    return _transport(model, maps, method="mean" if mean else "linear")


def _tensors(path) -> dict:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(str(path)).tensors}


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**encode(tokenizer, PROMPTS)).logits


def test_the_checkpoint_holds_the_folded_weights_and_copies_everything_else(
    smollm2, source, tmp_path
):
    model, _ = smollm2
    transport = _o_proj(model)
    written = export_gguf(model, transport, smollm2_gguf(), tmp_path / "steered.gguf", 0.8)
    out = gguf.GGUFReader(str(written.path))
    assert written.added == [f"blk.{i}.attn_output.bias" for i in O_PROJ_LAYERS]
    # metadata: every field of the source, with the same value
    for name, field in source.fields.items():
        if not name.startswith("GGUF."):
            assert out.fields[name].contents() == field.contents(), name
    tensors = {tensor.name: tensor for tensor in out.tensors}
    assert len(tensors) == len(source.tensors) + len(O_PROJ_LAYERS)
    for tensor in source.tensors:
        copied = tensors[tensor.name]
        if tensor.name in written.tensors:
            continue
        assert copied.tensor_type == tensor.tensor_type and np.array_equal(copied.data, tensor.data)
    # the folded tensors, in float32, are the closed form diag(scale) W and b = shift
    for i in O_PROJ_LAYERS:
        coefficients = transport.maps[f"model.layers.{i}.self_attn.o_proj"].coefficients(0.8)
        old = model.model.layers[i].self_attn.o_proj.weight.detach()
        weight, bias = tensors[f"blk.{i}.attn_output.weight"], tensors[f"blk.{i}.attn_output.bias"]
        assert weight.tensor_type == bias.tensor_type == gguf.GGMLQuantizationType.F32
        expected = coefficients.scale[:, None] * old
        torch.testing.assert_close(torch.from_numpy(weight.data.copy()), expected)
        assert torch.equal(torch.from_numpy(bias.data.copy()), coefficients.shift)
    assert model.model.layers[15].self_attn.o_proj.bias is None  # the model is left as it was


@pytest.mark.parametrize("tensor_type", ["f32", "f16"])
def test_a_float_checkpoint_holds_every_tensor_dequantized(smollm2, source, tmp_path, tensor_type):
    model, _ = smollm2
    path = tmp_path / f"{tensor_type}.gguf"
    written = export_gguf(model, _o_proj(model), smollm2_gguf(), path, tensor_type=tensor_type)
    out = _tensors(path)
    file_type = gguf.GGUFReader(str(path)).fields["general.file_type"].contents()
    assert file_type == {"f32": 0, "f16": 1}[tensor_type]
    for tensor in source.tensors:
        if tensor.name in written.tensors:
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        half = tensor_type == "f16" and values.ndim > 1
        wanted = gguf.GGMLQuantizationType.F16 if half else gguf.GGMLQuantizationType.F32
        assert out[tensor.name].tensor_type == wanted, tensor.name
        expected = values.astype(np.float16) if half else values
        assert np.array_equal(out[tensor.name].data, expected), tensor.name


def test_a_control_vector_adds_the_shifts_to_block_outputs_as_llama_cpp_does(smollm2, tmp_path):
    model, tokenizer = smollm2
    transport = _blocks(model)
    written = export_control_vector(model, transport, tmp_path / "ocean.gguf", 0.5)
    reader = gguf.GGUFReader(str(written.path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == len(BLOCK_LAYERS)
    directions = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in reader.tensors}
    assert list(directions) == [f"direction.{i}" for i in BLOCK_LAYERS]
    for i in BLOCK_LAYERS:
        assert torch.equal(
            directions[f"direction.{i}"], 0.5 * transport.maps[f"model.layers.{i}"].beta
        )

    def add(direction):
        return lambda module, args, output: output + direction

    handles = [
        model.model.layers[i].register_forward_hook(add(directions[f"direction.{i}"]))
        for i in BLOCK_LAYERS
    ]
    try:
        replayed = _logits(model, tokenizer)
    finally:
        for handle in handles:
            handle.remove()
    with steer(model, transport, 0.5):
        hooked = _logits(model, tokenizer)
    assert (hooked - _logits(model, tokenizer)).abs().max() > 0.1
    torch.testing.assert_close(replayed, hooked, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"support": "range"}, "support 'range'"),
        ({"site": "q_proj"}, "stores this tensor rearranged"),
        ({"tensor_type": "q8_0"}, "unknown GGUF tensor type 'q8_0'"),
        ({"strength": float("nan")}, "strength must be finite"),
        ({"source": "text"}, "as a GGUF file"),
    ],
)
def test_bad_checkpoint_exports_are_refused_and_write_nothing(smollm2, tmp_path, change, message):
    model, _ = smollm2
    transport = _o_proj(
        model, support=change.get("support", "all"), site=change.get("site", "o_proj")
    )
    text = tmp_path / "notes.txt"
    text.write_text("not a GGUF")
    source = text if change.get("source") else smollm2_gguf()
    options = {key: change[key] for key in ("tensor_type",) if key in change}
    with pytest.raises(ActError, match=message):
        export_gguf(
            model, transport, source, tmp_path / "out.gguf", change.get("strength", 1.0), **options
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_gguf_of_another_model_and_a_transport_of_another_model_are_refused(smollm2, tmp_path):
    model, _ = smollm2
    transport = _o_proj(model)
    other = export_gguf(model, transport, smollm2_gguf(), tmp_path / "other.gguf").path
    with pytest.raises(
        ActError, match=r"does not hold 'model\.layers\.15\.self_attn\.o_proj\.weight'"
    ):
        export_gguf(model, transport, other, tmp_path / "out.gguf")
    wrong = Transport(
        transport.maps, "linear", "all", 16, 16, "Other",
        {site: {"weight": [7, 7]} for site in transport.sites},
    )  # fmt: skip
    with pytest.raises(ModelMismatchError):
        export_gguf(model, wrong, smollm2_gguf(), tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_existing_file_is_kept_unless_overwritten_and_a_failed_write_leaves_nothing(
    smollm2, tmp_path, monkeypatch
):
    model, _ = smollm2
    path = tmp_path / "steered.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(ActError, match="exists"):
        export_gguf(model, _o_proj(model), smollm2_gguf(), path)
    calls = []

    def fail_after_three(self, tensor, tensor_endianess=None):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return original(self, tensor, tensor_endianess)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_after_three)
    with pytest.raises(ActError, match="No space left on device"):
        export_gguf(model, _o_proj(model), smollm2_gguf(), path, overwrite=True)
    assert path.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        (lambda model: _blocks(model, layers=(0, 1)), "cannot steer the first layer"),
        (lambda model: _blocks(model, mean=False), "scales 576 of 576 units"),
        (lambda model: _o_proj(model), "is not the output of a decoder layer"),
        (lambda model: _o_proj(model, support="range"), "support 'range'"),
    ],
)
def test_maps_a_control_vector_cannot_hold_are_refused_by_name(
    smollm2, tmp_path, transport, message
):
    model, _ = smollm2
    with pytest.raises(ActError, match=message):
        export_control_vector(model, transport(model), tmp_path / "c.gguf")
    assert not any(tmp_path.iterdir())


def test_the_export_command_writes_ggufs_and_checks_before_loading(smollm2, tmp_path, capsys):
    model, _ = smollm2
    _o_proj(model).save(tmp_path / "o_proj.safetensors")
    _blocks(model).save(tmp_path / "blocks.safetensors")
    command = ["export", "--transport"]
    assert (
        main([*command, str(tmp_path / "o_proj.safetensors"), "--out", str(tmp_path / "s.gguf")])
        == 0
    )
    assert "3 of them new biases" in capsys.readouterr().out
    assert len(_tensors(tmp_path / "s.gguf")) == 275
    arguments = [*command, str(tmp_path / "blocks.safetensors"), "--format", "control-vector"]
    assert main([*arguments, "--out", str(tmp_path / "c.gguf")]) == 0
    assert "--control-vector" in capsys.readouterr().out
    assert list(_tensors(tmp_path / "c.gguf")) == [f"direction.{i}" for i in BLOCK_LAYERS]
    folder = ["--model", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "f.gguf")]
    assert main([*command, str(tmp_path / "o_proj.safetensors"), *folder]) == 1
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err
    assert main([*arguments, "--out", str(tmp_path / "c.txt")]) == 1
    assert "must end with .gguf" in capsys.readouterr().err
    assert main([*arguments, "--gguf-type", "f16", "--out", str(tmp_path / "d.gguf")]) == 1
    assert "--gguf-type is for --format gguf" in capsys.readouterr().err
