"""Steering goals for text: what a transport is for decides where it applies.

The paper's rule: **mitigation** (moving away from a behaviour the model shows, e.g.
toxicity) transports only inside the range of the source activations (support "range"), so
text unlike the source is left alone; **induction** (adding a concept) transports every
activation (support "all"). Fitted with "range", a concept is barely visible (a pirate concept
from 30 + 30 sentences hardly changed chat answers at λ = 1; with "all" it was clear). Both
goals hook the family's layer preset (`llm`).

Detoxification uses Mean-AcT (a per-unit shift) on mean-pooled samples, chosen on SmolLM2 with
`bench/text.py --prompts tuning` (toxic starts that are never reported) against Linear-AcT,
per-token samples and fewer layers. At λ = 1 it removed as much toxicity as Linear-AcT (mean
p(toxic) 0.126 -> 0.032 vs 0.033) for less perplexity on both neutral texts (up 19.7% and 6.7%
vs 20.8% and 7.8%); per-token samples cost more perplexity for the same toxicity (0.026 for
31.6% and 14.5%), and hooking only layers 20–29 at λ = 1 (0.050 for 6.6%) removed less than
λ = 0.5 on the preset's 15 layers (0.045 for 6.8%).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ActError
from .data import CONCEPTS, lines


@dataclass(frozen=True)
class Goal:
    """What a transport is for, and the settings that follow from it: where maps apply
    (`support`), the hooked `layers`, the estimation `method` and the `pooling` of samples."""

    name: str
    support: str
    layers: str
    description: str
    method: str = "linear"
    pooling: str = "mean"

    def options(self) -> dict[str, str]:
        """The goal's keyword arguments of `fit_text`: `fit_text(..., **goal.options())`."""
        return {
            "method": self.method,
            "support": self.support,
            "layers": self.layers,
            "pooling": self.pooling,
        }


GOALS = {
    "detox": Goal(
        "detox",
        "range",
        "llm",
        "mitigation: move away from the source, only where it shows",
        method="mean",
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
