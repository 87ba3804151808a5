"""Caption sets for image prompts, and source/target prompt pairs made from them.

A style or concept transport is fitted on paired prompts: line n of the targets is line n
of the sources plus the style (", watercolor painting") or minus the concept ("with a pink
elephant"). `caption_set` gives a shipped set (`act/diffusers/data`) or "mixed" (every set
in turn); `paired_captions` makes the pairs from any list of captions.
"""

from __future__ import annotations

import re
from importlib.resources import files

from ..errors import ActError

SETS = ("people", "animals", "places", "objects", "times_of_day")
MIXED = "mixed"
NAMES = (MIXED, *SETS)
MIXED_PER_SET = 8
PLACEMENTS = ("suffix", "prefix")


def caption_set(name: str) -> list[str]:
    """The captions of a shipped set, e.g. `caption_set("animals")` (40 lines); "mixed" takes
    8 evenly spaced captions of each set, the sets in turn (40 lines).

    Raises:
        ActError: `name` is not one of `NAMES`.
    """
    if name not in NAMES:
        raise ActError(f"unknown caption set {name!r}; choose one of {', '.join(NAMES)}")
    if name != MIXED:
        return _lines(name)
    columns = []
    for each in SETS:
        lines = _lines(each)
        step = len(lines) // MIXED_PER_SET
        columns.append(lines[::step][:MIXED_PER_SET])
    return [caption for row in zip(*columns, strict=True) for caption in row]


def paired_captions(
    captions: list[str], add: str = "", remove: str = "", placement: str = "suffix"
) -> tuple[list[str], list[str]]:
    """Source and target prompts: the captions as they are, and the same captions with
    `remove` taken out (every occurrence, any case) and `add` put after them ("suffix": a
    leading comma is kept, else one is inserted) or before them ("prefix": joined by a
    space).

    Blank captions and `#` comments are skipped.

    Raises:
        ActError: no captions; neither `add` nor `remove` given; an unknown `placement`; or
            `remove` missing from some or all captions, or a caption that is nothing else
            (the message names the phrase and such a caption).
    """
    if placement not in PLACEMENTS:
        raise ActError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    sources = [line.strip() for line in captions]
    sources = [line for line in sources if line and not line.startswith("#")]
    if not sources:
        raise ActError("there are no captions: choose a caption set or write one per line")
    add, remove = add.strip(), remove.strip()
    if not add and not remove:
        raise ActError(
            "nothing to change: give what to add (e.g. ', watercolor painting') or what to "
            "remove (e.g. 'with a pink elephant')"
        )
    if remove:
        _check_removable(sources, remove)
    targets = [_added(_removed(caption, remove), add, placement) for caption in sources]
    return sources, targets


def _check_removable(captions: list[str], phrase: str) -> None:
    """Every caption holds `phrase`, and more than `phrase`."""
    pattern = re.compile(re.escape(phrase), re.IGNORECASE)
    missing = [caption for caption in captions if not pattern.search(caption)]
    if len(missing) == len(captions):
        raise ActError(
            f"remove: {phrase!r} occurs in none of the {len(captions)} captions (e.g. "
            f"{captions[0]!r}); the source captions must show it, the targets are the same "
            "captions without it"
        )
    if missing:
        raise ActError(
            f"remove: {phrase!r} is missing from {len(missing)} of the {len(captions)} "
            f"captions, e.g. {missing[0]!r}; add it there or drop those captions (a pair "
            "without it teaches nothing)"
        )
    empty = [caption for caption in captions if not _removed(caption, phrase)]
    if empty:
        raise ActError(f"remove: the caption {empty[0]!r} is nothing but {phrase!r}")


def _removed(caption: str, phrase: str) -> str:
    """`caption` without `phrase`, with the spaces and commas around it tidied."""
    if not phrase:
        return caption
    text = re.compile(re.escape(phrase), re.IGNORECASE).sub(" ", caption)
    text = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s+", " ", text))
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def _added(caption: str, addition: str, placement: str) -> str:
    if not addition:
        return caption
    if placement == "prefix":
        return f"{addition} {caption}"
    joiner = "" if addition[0] in ",;:." else ", "
    return f"{caption}{joiner}{addition}"


def _lines(name: str) -> list[str]:
    """The non-empty lines of a shipped set's file."""
    text = files(f"{__package__}.data").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
