"""Module selection: presets, regular expressions and helpful errors."""

import pytest
from helpers import ConvNet, Pair, Stack

from act import ActError, register_preset, select_modules
from act.selection import PRESETS


def test_regex_must_match_whole_names_and_keeps_definition_order():
    model = Stack()
    assert select_modules(model, r"blocks\.\d+\.norm") == [f"blocks.{i}.norm" for i in range(3)]
    assert select_modules(model, [r"blocks\.2\.proj", r"blocks\.0\.norm"]) == [
        "blocks.2.proj",
        "blocks.0.norm",
    ]
    with pytest.raises(ActError, match="matches no module"):
        select_modules(model, r"blocks\.1\.no")  # a prefix of a name is not a match


def test_norm_preset_and_tuple_suffix():
    assert select_modules(ConvNet(), "norms") == ["norm"]
    assert select_modules(Stack(depth=2), "norms") == ["blocks.0.norm", "blocks.1.norm"]
    assert select_modules(Pair(), "block:1") == ["block:1"]


def test_unknown_patterns_list_near_matches_and_presets():
    with pytest.raises(ActError) as raised:
        select_modules(Stack(), "blocks.7.norm")
    message = str(raised.value)
    assert "'blocks.7.norm'" in message and "blocks.0.norm" in message and "norms" in message
    with pytest.raises(ActError, match="not a valid regular expression"):
        select_modules(Stack(), "blocks.(")
    with pytest.raises(ActError, match="no layers"):
        select_modules(Stack(), [])


def test_registered_presets_resolve_patterns():
    register_preset("test-projections", "projections", [r"blocks\.\d+\.proj"])
    try:
        assert select_modules(Stack(depth=2), "test-projections") == [
            "blocks.0.proj",
            "blocks.1.proj",
        ]
        with pytest.raises(ActError, match="found no module"):
            select_modules(ConvNet(), "test-projections")
    finally:
        PRESETS.pop("test-projections")
