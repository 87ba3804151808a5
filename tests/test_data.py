"""The shipped prompt sets: balanced fitting sets, held-out evaluation sets."""

import re
from pathlib import Path

import pytest

from act.errors import ActError
from act.text.data import CONCEPTS, NAMES, lines

FITTING = ("toxic", "nontoxic", *CONCEPTS, "generic")
HELD_OUT = ("toxic_prompts", "concept_prompts", "neutral")


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z']+", text.lower()))


@pytest.mark.parametrize("name", NAMES)
def test_every_set_is_non_empty_and_has_no_duplicates(name):
    sentences = lines(name)
    assert len(sentences) >= 24
    assert len({_words(s) for s in sentences}) == len(sentences)
    assert all(s == s.strip() and "\n" not in s for s in sentences)


def test_fitting_sets_are_balanced():
    assert len(lines("toxic")) == len(lines("nontoxic")) == 64
    assert {len(lines(name)) for name in (*CONCEPTS, "generic")} == {64}


@pytest.mark.parametrize("held_out", HELD_OUT)
def test_held_out_prompts_do_not_overlap_the_fitting_sentences(held_out):
    fitting = [_words(s) for name in FITTING for s in lines(name)]
    for prompt in map(_words, lines(held_out)):
        assert not any(prompt in sentence or sentence in prompt for sentence in fitting), prompt


def test_unknown_set_names_the_choices():
    with pytest.raises(ActError, match="toxic, nontoxic"):
        lines("jigsaw")


@pytest.mark.parametrize("name", ["toxic_prompts_tuning", "neutral_independent"])
def test_bench_sets_share_no_sentence_with_the_shipped_sets(name):
    """bench/data: the toxic starts the detox default was chosen on and the second neutral
    text are independent of every shipped set (fitting and reported)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "data" / f"{name}.txt"
    sentences = [_words(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    assert len(sentences) >= 48 and len(set(sentences)) == len(sentences)
    shipped = [_words(s) for shipped_name in NAMES for s in lines(shipped_name)]
    for sentence in sentences:
        assert not any(sentence in other or other in sentence for other in shipped), sentence
