"""The shipped image caption sets and the source/target pairs made from them."""

import re

import pytest

from act import ActError
from act.diffusers.captions import MIXED, NAMES, SETS, caption_set, paired_captions

STYLE_WORDS = re.compile(
    r"\b(photo\w*|paint\w*|watercolou?r|sketch\w*|drawing|illustration|style|render\w*|"
    r"elephants?)\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("name", SETS)
def test_each_shipped_set_is_a_few_dozen_distinct_plain_captions(name):
    captions = caption_set(name)
    assert 32 <= len(captions) <= 48
    assert len(set(captions)) == len(captions)
    assert all(caption == caption.strip() and caption for caption in captions)
    styled = [caption for caption in captions if STYLE_WORDS.search(caption)]
    assert not styled, (
        f"captions that already carry a style or the negation demo's concept: {styled}"
    )


def test_no_caption_is_shared_between_sets():
    seen: dict[str, str] = {}
    for name in SETS:
        for caption in caption_set(name):
            assert caption not in seen, f"{caption!r} is in {seen.get(caption)} and {name}"
            seen[caption] = name


def test_the_mixed_set_takes_evenly_from_every_set_in_turn():
    mixed = caption_set(MIXED)
    origin = {caption: name for name in SETS for caption in caption_set(name)}
    assert 32 <= len(mixed) <= 48 and len(set(mixed)) == len(mixed)
    assert [origin[caption] for caption in mixed[: len(SETS)]] == list(SETS)
    counts = {name: sum(origin[caption] == name for caption in mixed) for name in SETS}
    assert set(counts.values()) == {len(mixed) // len(SETS)}
    people = [caption for caption in mixed if origin[caption] == "people"]
    assert people != caption_set("people")[: len(people)]  # spread over the set, not its head


def test_an_unknown_set_is_named_with_the_choices():
    with pytest.raises(ActError, match=r"'watercolour'.*mixed, people"):
        caption_set("watercolour")
    assert NAMES[0] == MIXED


def test_a_style_is_appended_to_every_caption_line_for_line():
    captions = caption_set("animals")
    sources, targets = paired_captions(captions, add=", pencil sketch")
    assert sources == captions
    assert targets == [f"{caption}, pencil sketch" for caption in captions]


def test_a_style_without_a_comma_gets_one_and_a_prefix_is_joined_by_a_space():
    assert paired_captions(["a cat"], add="pencil sketch") == (["a cat"], ["a cat, pencil sketch"])
    assert paired_captions(["a cat"], add="  a watercolor painting of ", placement="prefix") == (
        ["a cat"],
        ["a watercolor painting of a cat"],
    )


def test_blank_lines_and_comments_are_skipped_on_both_sides():
    sources, targets = paired_captions(["# animals", "", "  a fox  ", "a crab"], add="at night")
    assert sources == ["a fox", "a crab"]
    assert targets == ["a fox, at night", "a crab, at night"]


def test_removing_a_concept_takes_it_out_in_any_case_and_tidies_the_commas():
    captions = [
        "a sunny town square, with a pink elephant in plain view",
        "With a Pink Elephant in plain view, a quiet harbour",
        "a kitchen with a pink elephant in plain view and a kettle",
    ]
    sources, targets = paired_captions(captions, remove="with a pink elephant in plain view")
    assert sources == captions
    assert targets == ["a sunny town square", "a quiet harbour", "a kitchen and a kettle"]


def test_remove_and_add_together_swap_one_thing_for_another():
    _, targets = paired_captions(["a photo of a cat"], remove="a photo of", add="oil painting")
    assert targets == ["a cat, oil painting"]


def test_a_phrase_in_no_caption_is_named():
    with pytest.raises(ActError, match=r"'pink elephant' occurs in none of the 40 captions"):
        paired_captions(caption_set("places"), remove="pink elephant")


def test_a_caption_without_the_phrase_is_named():
    captions = ["a beach, with a pink elephant", "a forest", "a road, with a pink elephant"]
    with pytest.raises(ActError, match=r"missing from 1 of the 3 captions, e.g. 'a forest'"):
        paired_captions(captions, remove="with a pink elephant")


def test_a_caption_that_is_only_the_phrase_is_refused():
    with pytest.raises(ActError, match=r"'a pink elephant' is nothing but"):
        paired_captions(["a pink elephant", "a pink elephant in a car"], remove="a pink elephant")


@pytest.mark.parametrize(
    ("captions", "options", "message"),
    [
        (["a cat"], {}, "nothing to change"),
        (["a cat"], {"add": "   ", "remove": ""}, "nothing to change"),
        (["", "# only a comment"], {"add": "x"}, "there are no captions"),
        (["a cat"], {"add": "x", "placement": "middle"}, "unknown placement 'middle'"),
    ],
)
def test_unusable_requests_are_refused(captions, options, message):
    with pytest.raises(ActError, match=message):
        paired_captions(captions, **options)
