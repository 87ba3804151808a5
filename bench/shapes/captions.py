"""Captions of shapes-world records, in varied wording.

A caption is a pure function of (record, seed, options): the seed picks the template, the
synonyms, and whether sizes and the background are mentioned; the options say how colour is
worded. The same seed with different options gives the same sentence but for those words,
which is what paired prompts need:

    caption(record, 7, colours=False)         "a circle next to a square on white"
    caption(record, 7, colour_phrase="red")   "a circle next to a square in red on white"
    caption(record.without("square"), 7)      "a blue circle on white"
"""

from __future__ import annotations

import re

import numpy as np

from .world import COLOURS, SHAPES, SIZES, Record

SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",)}
COLOUR_WORDS = {colour: (colour,) for colour in COLOURS} | {"purple": ("purple", "violet")}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
BACKGROUND_PHRASES = {
    "grey": ("on a grey background", "on a gray background", "on grey", "against a grey backdrop"),
    "white": ("on a white background", "on white", "against a plain white backdrop"),
    "black": ("on a black background", "on black", "against a plain black backdrop"),
    "striped": ("on a striped background", "on stripes", "against a striped backdrop"),
    "mottled": ("on a mottled background", "on a blotchy background", "against a mottled backdrop"),
}
ONE_OBJECT = (
    "{0}",
    "a picture of {0}",
    "an image of {0}",
    "a drawing of {0}",
    "there is {0}",
    "one shape: {0}",
)
TWO_OBJECTS = (
    "{0} and {1}",
    "{0} next to {1}",
    "{0} beside {1}",
    "two shapes: {0} next to {1}",
    "two objects, {0} and {1}",
    "a picture of {0} and {1}",
    "a picture with {0} and {1}",
)
# In the vocabulary but never in a training caption (for negation prompts).
UNSEEN_WORDS = ("without", "no", "not")
WORD_PATTERN = r"\w+|[^\w\s]+"  # the tokenizer's word split


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(
    record: Record,
    seed: int,
    colours: bool = True,
    colour_phrase: str | None = None,
    sizes: bool | None = None,
    background: bool | None = None,
) -> str:
    """Describe a record in words chosen by `seed`.

    Args:
        record: the scene (1 or 2 objects).
        seed: picks the template and synonyms; a fixed seed gives a fixed wording.
        colours: name each object's colour ("a red circle"); False leaves colours out.
        colour_phrase: a colour for the whole scene, said once after the objects ("a circle
            and a square in red"); object colours are then never named.
        sizes: mention sizes; None lets the seed decide (half of the time).
        background: mention the background; None lets the seed decide (60% of the time).
    Returns:
        The caption, lower case.
    """
    if len(record.objects) not in (1, 2):
        raise ValueError(f"a caption needs 1 or 2 objects, the record has {len(record.objects)}")
    if colour_phrase is not None and colour_phrase not in COLOURS:
        raise ValueError(f"unknown colour {colour_phrase!r}; choose one of {', '.join(COLOURS)}")
    rng = np.random.default_rng(seed)  # every choice drawn always, so options don't shift them
    templates = ONE_OBJECT if len(record.objects) == 1 else TWO_OBJECTS
    template = templates[rng.integers(len(templates))]
    choices = rng.integers(0, 2**16, size=(2, 3))
    with_sizes = rng.random() < 0.5 if sizes is None else sizes
    with_background = rng.random() < 0.6 if background is None else background
    background_words = BACKGROUND_PHRASES[record.background]
    background_words = background_words[rng.integers(len(background_words))]

    phrases = []
    for obj, choice in zip(record.objects, choices, strict=False):
        words = [SHAPE_WORDS[obj.shape][choice[0] % len(SHAPE_WORDS[obj.shape])]]
        if colours and colour_phrase is None:
            words.insert(0, COLOUR_WORDS[obj.colour][choice[1] % len(COLOUR_WORDS[obj.colour])])
        if with_sizes:
            words.insert(0, SIZE_WORDS[obj.size][choice[2] % len(SIZE_WORDS[obj.size])])
        phrases.append(_article(" ".join(words)))
    text = template.format(*phrases)
    if colour_phrase is not None:
        text += f" in {colour_phrase}"
    if with_background:
        text += " " + background_words
    return text


def training_caption(record: Record, rng: np.random.Generator) -> str:
    """A caption drawn the way training sees them: colours left out (10%), said once as
    "in <colour>" (15% of the scenes whose objects share a colour), otherwise named."""
    seed = int(rng.integers(2**31))
    mode = rng.random()
    if mode < 0.1:
        return caption(record, seed, colours=False)
    same = {obj.colour for obj in record.objects}
    if mode < 0.25 and len(same) == 1:
        return caption(record, seed, colour_phrase=same.pop())
    return caption(record, seed)


def vocabulary() -> list[str]:
    """Every word a caption can use, plus `UNSEEN_WORDS`, sorted."""
    texts = [template.format("", "") for template in (*ONE_OBJECT, *TWO_OBJECTS)]
    texts += ["a an in", *UNSEEN_WORDS, *COLOURS, *SHAPES, *SIZES]
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, BACKGROUND_PHRASES):
        texts += [phrase for phrases in table.values() for phrase in phrases]
    words = {word for text in texts for word in re.findall(WORD_PATTERN, text)}
    return sorted(words)
