"""Exports: LoRA files of weight differences, and steered causal LMs as plain folders.

Equivalence is checked in float32 on the CPU: a model with a loaded LoRA (or an exported
folder) may differ from hooked steering by at most 1e-5, absolute and relative (measured on
the logits: up to 6e-8 on the tiny Llama; 3.6e-5 on SmolLM2, whose logits reach 30, so 1e-4
absolute there).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ConvNet, Stack, random_map
from safetensors import safe_open
from text_models import save_tiny_llama
from torch import nn

from act import ActError, ModelMismatchError, ModuleMap, Transport, export_lora, steer
from act.hooks import module_fingerprint
from act.text import encode, load_causal_lm
from act.text.cli import main
from act.text.export import export_causal_lm

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
PROMPTS = ["The sea was calm that", "She finished reading the"]


def _transport(model, maps, support="all", method="linear") -> Transport:
    fingerprint = module_fingerprint(model, list(maps))
    return Transport(maps, method, support, 16, 16, type(model).__name__, fingerprint)


def _mean_map(units: int, seed: int = 0) -> ModuleMap:
    """Mean-AcT: omega = 1, a shift only."""
    shifted = random_map(units, seed=seed)
    return ModuleMap(torch.ones(units), shifted.beta, *(shifted.source_lo, shifted.source_hi),
                     shifted.target_lo, shifted.target_hi)  # fmt: skip


def _load_lora(model: nn.Module, path, strength: float) -> None:
    """Add a LoRA file's differences times `strength` to the weights, as a loader does."""
    with safe_open(str(path), "pt") as file, torch.no_grad():
        for key in file.keys():  # noqa: SIM118 (safe_open has no __iter__)
            name, _, kind = key.rpartition(".")
            parameter = model.get_parameter(f"{name}.{'weight' if kind == 'diff' else 'bias'}")
            parameter.add_(strength * file.get_tensor(key))


# ----- LoRA files -----------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("strength", [0.5, 1.0, 1.5])
def test_a_lora_at_strength_s_equals_steering_at_s(tmp_path, strength):
    model, x = Stack(), torch.randn(2, 5, 4)
    maps = {"blocks.0.norm": random_map(8, seed=1), "blocks.1.proj": random_map(8, seed=2)}
    transport = _transport(model, maps)
    written = export_lora(transport, model, tmp_path / "style.safetensors")
    assert written.folded == list(maps) and not written.left_out
    with steer(model, transport, strength):
        hooked = model(x)
    _load_lora(model, written.path, strength)
    torch.testing.assert_close(model(x), hooked, **TOLERANCE)


@torch.no_grad()
def test_mean_act_on_group_norm_channels_folds_into_the_bias(tmp_path):
    model, x = ConvNet(), torch.randn(2, 3, 8, 8)
    transport = _transport(model, {"norm": _mean_map(6)}, method="mean")
    path = export_lora(transport, model, tmp_path / "mean.safetensors").path
    with safe_open(path, "pt") as file:
        assert set(file.keys()) == {"norm.diff_b"}  # the weight does not change
    with steer(model, transport, -0.5):  # a shift is linear in the strength, also below 0
        hooked = model(x)
    _load_lora(model, path, -0.5)
    torch.testing.assert_close(model(x), hooked, **TOLERANCE)


def test_unfoldable_sites_are_named_and_left_out_only_when_allowed(tmp_path):
    model = ConvNet()
    transport = _transport(model, {"norm": random_map(6), "conv_out": _mean_map(3)})
    path = tmp_path / "partial.safetensors"
    with pytest.raises(ActError, match=r"(?s)1 of 2 modules.*'norm' \(GroupNorm\).*omega = 1"):
        export_lora(transport, model, path)
    assert not path.exists()
    written = export_lora(transport, model, path, allow_partial=True)
    assert written.folded == ["conv_out"] and list(written.left_out) == ["norm"]
    assert "left out 1 modules" in written.summary()
    with safe_open(str(path), "pt") as file:
        assert '"left_out": {"norm"' in file.metadata()["act_export"]


def test_a_pipeline_exports_every_component_under_its_name(tmp_path):
    class Pipeline:
        def __init__(self) -> None:
            self.components = {"unet": Stack(), "text_encoder": Stack(), "scheduler": object()}

    pipe = Pipeline()
    maps = {"unet.blocks.0.norm": random_map(8), "text_encoder.blocks.2.proj": random_map(8)}
    transport = Transport(maps, "linear", "all", 16, 16)
    path = export_lora(transport, pipe, tmp_path / "pipe.safetensors").path
    with safe_open(path, "pt") as file:
        assert {"unet.blocks.0.norm.diff", "text_encoder.blocks.2.proj.diff_b"} <= set(file.keys())
    stray = Transport({"vae.decoder": random_map(8)}, "linear", "all", 16, 16)
    with pytest.raises(ModelMismatchError, match=r"vae\.decoder"):
        export_lora(stray, pipe, tmp_path / "stray.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strength": math.nan}, "strength must be finite, got nan"),
        ({"strength": math.inf}, "strength must be finite, got inf"),
        ({"path": "style.pt"}, r"must end with \.safetensors"),
        ({"support": "range"}, "support 'range'"),
        ({"model": Stack(width=16)}, r"shape \(16,\)"),
    ],
)
def test_bad_lora_exports_are_refused_and_write_nothing(tmp_path, change, message):
    model = Stack()
    transport = _transport(
        model,
        {"blocks.0.norm": random_map(8, bounded="support" in change)},
        change.get("support", "all"),
    )
    path = tmp_path / change.get("path", "style.safetensors")
    with pytest.raises(ActError, match=message):
        export_lora(transport, change.get("model", model), path, change.get("strength", 1.0))
    assert list(tmp_path.iterdir()) == []


def test_existing_and_unwritable_lora_files_are_refused(tmp_path):
    model = Stack()
    transport = _transport(model, {"blocks.0.norm": random_map(8)})
    path = tmp_path / "style.safetensors"
    export_lora(transport, model, path)
    before = path.read_bytes()
    with pytest.raises(ActError, match=r"style\.safetensors' exists; overwrite it"):
        export_lora(transport, model, path, 0.5)
    assert path.read_bytes() == before
    export_lora(transport, model, path, 0.5, overwrite=True)
    assert path.read_bytes() != before
    blocked = tmp_path / "a file" / "style.safetensors"
    blocked.parent.write_text("not a folder")
    with pytest.raises(ActError, match=r"cannot write '.*a file/style\.safetensors'"):
        export_lora(transport, model, blocked)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "style.safetensors"]


# ----- causal LMs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = save_tiny_llama(tmp_path_factory.mktemp("llama") / "model")
    model, tokenizer = load_causal_lm(folder)
    return folder, model, tokenizer


def _o_proj_transport(model, layers=(0, 1), support="all") -> Transport:
    width = model.config.hidden_size
    maps = {
        f"model.layers.{i}.self_attn.o_proj": random_map(width, bounded=support != "all", seed=i)
        for i in layers
    }
    return _transport(model, maps, support)


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**encode(tokenizer, PROMPTS)).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_the_exported_llama_equals_hooked_steering(llama, tmp_path, strength):
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = llama
    transport = _o_proj_transport(model)
    before = _state(model)
    written = export_causal_lm(model, tokenizer, transport, tmp_path / "steered", strength)
    assert written.bias_switches == ["attention_bias"]
    exported, info = AutoModelForCausalLM.from_pretrained(written.path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert type(exported) is type(model) and exported.config.attention_bias
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.bias, torch.zeros(32))
    with steer(model, transport, strength):
        hooked = _logits(model, tokenizer)
    torch.testing.assert_close(_logits(exported, tokenizer), hooked, **TOLERANCE)
    # the model itself is left as it was
    assert not model.config.attention_bias and model.model.layers[0].self_attn.o_proj.bias is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("model.layers.0.post_attention_layernorm", "'model.layers.0.post_attention_layernorm' "
         r"\(LlamaRMSNorm\) has no bias"),
        ("model.layers.1", "only nn.Linear and nn.LayerNorm"),
    ],
)  # fmt: skip
def test_layers_without_a_place_for_the_map_are_refused_by_name(llama, tmp_path, site, message):
    _, model, tokenizer = llama
    transport = _transport(model, {site: random_map(32)})
    before = _state(model)
    with pytest.raises(ActError, match=message):
        export_causal_lm(model, tokenizer, transport, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_linear_without_a_bias_switch_is_refused_by_name(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    model = Qwen2ForCausalLM(config)  # o_proj has no bias, and Qwen2Config no switch for one
    site = "model.layers.0.self_attn.o_proj"
    with pytest.raises(ActError, match=rf"'{site}' \(Linear\) has no bias.*Qwen2Config has no"):
        export_causal_lm(model, None, _transport(model, {site: random_map(32)}), tmp_path / "out")
    assert model.model.layers[0].self_attn.o_proj.bias is None and list(tmp_path.iterdir()) == []


def test_range_transports_are_refused_with_the_foldable_choice(llama, tmp_path):
    _, model, tokenizer = llama
    ranged = _o_proj_transport(model, support="range")
    with pytest.raises(ActError, match=r"support 'range'.*--support all"):
        export_causal_lm(model, tokenizer, ranged, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_llm_exports_are_refused_and_write_nothing(llama, tmp_path):
    _, model, tokenizer = llama
    transport = _o_proj_transport(model)
    with pytest.raises(ActError, match="strength must be finite, got nan"):
        export_causal_lm(model, tokenizer, transport, tmp_path / "out", math.nan)
    wide, wide_tokenizer = load_causal_lm(save_tiny_llama(tmp_path / "wide", hidden=48))
    with pytest.raises(ModelMismatchError, match=r"o_proj.*\(48, 48\).*\(32, 32\)"):
        export_causal_lm(wide, wide_tokenizer, transport, tmp_path / "out")
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    with pytest.raises(ActError, match="cannot write"):
        export_causal_lm(model, tokenizer, transport, blocked / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "wide"]


def test_an_existing_folder_is_replaced_only_with_overwrite(llama, tmp_path):
    _, model, tokenizer = llama
    transport = _o_proj_transport(model)
    out = tmp_path / "out"
    export_causal_lm(model, tokenizer, transport, out, 1.0)
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(ActError, match=r"'.*out' exists"):
        export_causal_lm(model, tokenizer, transport, out, 0.5)
    assert (out / "model.safetensors").read_bytes() == first
    export_causal_lm(model, tokenizer, transport, out, 0.5, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_the_export_command_writes_a_loadable_folder(llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder, model, tokenizer = llama
    transport = _o_proj_transport(model)
    transport.save(tmp_path / "t.safetensors")
    arguments = ["export", "--model", str(folder), "--transport", str(tmp_path / "t.safetensors")]
    assert main([*arguments, "--strength", "0.5", "--out", str(tmp_path / "out")]) == 0
    assert "attention_bias=True" in capsys.readouterr().out
    with steer(model, transport, 0.5):
        hooked = _logits(model, tokenizer)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(exported, tokenizer), hooked, **TOLERANCE)
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*arguments, "--strength", "nan", "--out", str(tmp_path / "other")]) == 1
    assert "--strength must be a finite number" in capsys.readouterr().err
    _o_proj_transport(model, support="range").save(tmp_path / "range.safetensors")
    ranged = ["export", "--model", str(folder), "--transport", str(tmp_path / "range.safetensors")]
    assert main([*ranged, "--out", str(tmp_path / "other")]) == 1
    assert "support 'range'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_smollm2_exported_with_a_fitted_transport_equals_hooked_steering(tmp_path):
    from transformers import AutoModelForCausalLM

    from act.text import fit_text
    from act.text.data import lines

    model, tokenizer = load_causal_lm("smollm2")
    transport = fit_text(
        model, tokenizer, lines("generic")[:8], lines("ocean")[:8], support="all", progress=False
    )
    assert len(transport.sites) == 15  # o_proj of layers 15-29
    written = export_causal_lm(model, tokenizer, transport, tmp_path / "smollm2-ocean")
    exported = AutoModelForCausalLM.from_pretrained(written.path)
    with steer(model, transport, 1.0):
        hooked = _logits(model, tokenizer)
    plain = _logits(model, tokenizer)
    assert (hooked - plain).abs().max() > 0.1
    torch.testing.assert_close(_logits(exported, tokenizer), hooked, rtol=1e-5, atol=1e-4)
