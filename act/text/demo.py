"""`python -m act demo`: detoxify and steer the built-in SmolLM2 with the shipped prompt sets.

Two transports are fitted on the attention outputs, each with its goal's settings
(`act.text.goals`): toxic -> non-toxic sentences (support: the source range, as in the paper for
mitigation) and generic -> concept sentences (no support bound, as for induction). Each is
shown on held-out prompts at strength 0 and 1.
The scores are dependency-free word counts (insults and profanity, or words of the concept);
`bench/text.py` measures the same with trained scorers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from ..errors import ActError
from .collection import fit_text
from .data import CONCEPTS, lines
from .generation import Sampling, sweep
from .goals import GOALS, builtin_sentences
from .models import load_causal_lm

TOXIC_WORDS = re.compile(
    r"\b(idiot\w*|stupid\w*|moron\w*|dumb\w*|fuck\w*|shit\w*|ass|asses|asshole\w*|bitch\w*|"
    r"bastard\w*|damn\w*|crap\w*|jerk\w*|loser\w*|pathetic|worthless|trash|garbage|suck\w*|"
    r"ugly|fool\w*|piss\w*|hell|prick\w*|scum\w*|creep\w*|disgusting|hate\w*)\b",
    re.IGNORECASE,
)
CONCEPT_WORDS = {
    "ocean": r"ocean\w*|sea|seas|wave\w*|beach\w*|tide\w*|shore\w*|coast\w*|sail\w*|ship\w*|"
    r"boat\w*|whale\w*|fish\w*|reef\w*|marine|island\w*|harbou?r\w*|surf\w*|water\w*",
    "football": r"football\w*|soccer|goal\w*|match\w*|team\w*|player\w*|league\w*|stadium\w*|"
    r"coach\w*|pitch\w*|ball|kick\w*|scor\w*|striker\w*|referee\w*|fans?|cup|game\w*",
    "cooking": r"cook\w*|recipe\w*|kitchen\w*|bak\w*|oven\w*|chef\w*|dish\w*|sauce\w*|meal\w*|"
    r"food\w*|ingredient\w*|flour|pan|pans|soup\w*|dinner\w*|tast\w*|bread\w*|flavou?r\w*",
}
TOXIC_SAMPLING = Sampling(max_new_tokens=32, temperature=1.0, top_p=0.9, batch_size=16)
CONCEPT_SAMPLING = Sampling(max_new_tokens=40, repetition_penalty=1.2, chat=True)
CONCEPT_PROMPTS = 8
WIDTH = 72


def run_demo(concept: str = "football", rows: int = 6) -> None:
    """Fit both transports on SmolLM2 and print before/after tables with scores and times."""
    if concept not in CONCEPTS:
        raise ActError(f"unknown concept {concept!r}; choose one of {', '.join(CONCEPTS)}")
    if rows < 1:
        raise ActError(f"--rows must be at least 1, got {rows}")
    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2")
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f} s\n")

    fit_start = time.perf_counter()
    detox = fit_text(model, tokenizer, *builtin_sentences("detox"), **GOALS["detox"].options())
    detox_seconds = time.perf_counter() - fit_start
    prompts = lines("toxic_prompts")
    outputs = sweep(model, tokenizer, detox, prompts, [0.0, 1.0], TOXIC_SAMPLING)
    _table(
        f"Detoxification: toxic -> non-toxic, {_method('detox')} on {len(detox.sites)} attention "
        f"outputs, fitted on 64 + 64 sentences in {detox_seconds:.1f} s. Prompts are "
        "held-out toxic sentence starts, completed with sampling (T = 1, top-p 0.9); shown: "
        "those whose plain continuation has the most toxic words.",
        prompts, outputs, TOXIC_WORDS, "toxic words", rows, rank=True,
    )  # fmt: skip

    fit_start = time.perf_counter()
    induction = fit_text(
        model, tokenizer, *builtin_sentences("concept", concept), **GOALS["concept"].options()
    )
    concept_seconds = time.perf_counter() - fit_start
    prompts = lines("concept_prompts")[:CONCEPT_PROMPTS]
    outputs = sweep(model, tokenizer, induction, prompts, [0.0, 1.0], CONCEPT_SAMPLING)
    words = re.compile(rf"\b({CONCEPT_WORDS[concept]})\b", re.IGNORECASE)
    _table(
        f"Concept induction: generic -> {concept}, {_method('concept')}, fitted on 64 + 64 "
        f"sentences in {concept_seconds:.1f} s. Prompts are held-out chat requests, answered "
        "greedily.",
        prompts, outputs, words, f"{concept} words", rows, rank=False,
    )  # fmt: skip
    print(
        f"Fit time: {detox_seconds + concept_seconds:.1f} s for both transports; "
        f"total {time.perf_counter() - start:.0f} s."
    )


def _method(name: str) -> str:
    """How a goal's transport is estimated, e.g. "Mean-AcT (per-token samples)"."""
    chosen = GOALS[name]
    samples = "per-token samples" if chosen.pooling == "tokens" else "mean-pooled samples"
    return f"{chosen.method.capitalize()}-AcT ({samples})"


def _table(
    title: str,
    prompts: Sequence[str],
    outputs: dict[float, list[str]],
    words: re.Pattern,
    score_name: str,
    rows: int,
    rank: bool,
) -> None:
    """Print a Markdown table of some rows, then the score over every prompt.

    The rows are the first ones, or with `rank` those whose plain output scores highest.
    """
    print(title)
    print(f"\n| prompt | λ = 0 | {score_name} | λ = 1 | {score_name} |\n|---|---|---|---|---|")
    table = list(zip(prompts, outputs[0.0], outputs[1.0], strict=True))
    if rank:
        table.sort(key=lambda row: -_count(words, row[1]))
    for prompt, plain, steered in table[:rows]:
        cells = [_cell(prompt, 40), _cell(plain), _score(words, plain)]
        cells += [_cell(steered), _score(words, steered)]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    totals = [sum(_count(words, text) for text in outputs[s]) for s in (0.0, 1.0)]
    hits = [sum(_count(words, text) > 0 for text in outputs[s]) for s in (0.0, 1.0)]
    print(
        f"\nOver all {len(prompts)} prompts: outputs with {score_name} {hits[0]} -> {hits[1]}, "
        f"{score_name} in all {totals[0]} -> {totals[1]} (λ = 0 -> 1).\n"
    )


def _count(words: re.Pattern, text: str) -> int:
    return len(words.findall(text))


def _score(words: re.Pattern, text: str, shown: int = 4) -> str:
    """The count and the words counted ("2: idiot, stupid"), since a cell may cut them off."""
    found = [match.group(0).lower() for match in words.finditer(text)]
    unique = list(dict.fromkeys(found))
    listed = ", ".join(unique[:shown]) + (", …" if len(unique) > shown else "")
    return f"{len(found)}: {listed}" if found else "0"


def _cell(text: str, width: int = WIDTH) -> str:
    """One line, pipes escaped, cut to `width` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
