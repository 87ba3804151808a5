"""Steering goals for text: what a transport is for decides where it applies.

The paper's rule: **mitigation** (moving away from a behaviour the model shows, e.g.
toxicity) transports only inside the range of the source activations (support "range"), so
text unlike the source is left alone; **induction** (adding a concept) transports every
activation (support "all"). Fitted with "range", a concept is barely visible (a pirate concept
from 30 + 30 sentences hardly changed chat answers at λ = 1; with "all" it was clear). Both
goals hook the family's layer preset (`llm`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ActError
from .data import CONCEPTS, lines


@dataclass(frozen=True)
class Goal:
    """What a transport is for, and the settings that follow from it."""

    name: str
    support: str
    layers: str
    description: str


GOALS = {
    "detox": Goal(
        "detox", "range", "llm", "mitigation: move away from the source, only where it shows"
    ),
    "concept": Goal("concept", "all", "llm", "induction: move every activation to the target"),
}


def goal(name: str) -> Goal:
    """The goal called `name` ("detox" or "concept"), or an ActError listing them."""
    if name not in GOALS:
        raise ActError(f"unknown goal {name!r}; choose one of {', '.join(GOALS)}")
    return GOALS[name]


def builtin_sentences(name: str, concept: str = "football") -> tuple[list[str], list[str]]:
    """The shipped (source, target) sentences of a goal: toxic -> non-toxic for "detox",
    generic -> the concept's sentences (ocean, football or cooking) for "concept"."""
    if goal(name).name == "detox":
        return lines("toxic"), lines("nontoxic")
    if concept not in CONCEPTS:
        raise ActError(f"unknown concept {concept!r}; choose one of {', '.join(CONCEPTS)}")
    return lines("generic"), lines(concept)
