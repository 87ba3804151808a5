"""Prompt sets shipped with the library: short, hand-written for this project (Apache-2.0).

One sentence per line. Fitting sets: `toxic` / `nontoxic` (64 + 64, for detoxification),
`ocean`, `football`, `cooking` (64 each, concepts) and `generic` (64, their source set).
Held-out evaluation sets, sharing no sentence with the fitting sets: `toxic_prompts`
(48 toxic sentence starts for the model to complete), `concept_prompts` (24 neutral chat
requests) and `neutral` (40 encyclopedic sentences, for perplexity).
"""

from __future__ import annotations

from importlib.resources import files

from ...errors import ActError

CONCEPTS = ("ocean", "football", "cooking")
NAMES = (
    "toxic",
    "nontoxic",
    "toxic_prompts",
    *CONCEPTS,
    "generic",
    "concept_prompts",
    "neutral",
)


def lines(name: str) -> list[str]:
    """The non-empty lines of a shipped set, e.g. `lines("toxic")`."""
    if name not in NAMES:
        raise ActError(f"unknown prompt set {name!r}; choose one of {', '.join(NAMES)}")
    text = files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
