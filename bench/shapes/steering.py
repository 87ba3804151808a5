"""AcT on the shapes-world model, measured the way the paper measured SDXL and FLUX.

**Style control.** Fit on captions without a colour word (source) vs the same captions with
"in red" (target); generate held-out captions that name other colours and count the images
whose objects all turned red, and the images whose shapes are still the caption's (the
analogue of the paper's CLIP score: the content is kept while the style changes).

**Concept negation.** Fit on captions of two-object scenes, one a triangle (source), vs the
same captions with the triangle left out (target); generate held-out captions with a
triangle and count the images that still show one, and the images that keep the other
object (its shape and colour).

Each task runs a default configuration and one change at a time: Mean-AcT instead of
Linear-AcT, the UNet or the text encoder alone instead of both, the other support, causal
instead of simultaneous estimation. Fitting prompts (scene seed 2) and evaluation prompts
(scene seed 3) never share a scene, and neither is a training scene (seed 0).

    python -m bench.shapes.steering --count 100 --grids docs/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import act

from .captions import caption
from .fidelity import GUIDANCE, STEPS, generate, grid
from .model import MODEL_DIR, load_pipeline
from .scorers import detect_objects
from .world import Record, sample_records

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIT_SEED = 2
EVAL_SEED = 3
STYLE_COLOUR = "red"
NEGATED_SHAPE = "triangle"


@dataclass(frozen=True)
class Config:
    """How a transport is fitted: method, components, support and estimation."""

    method: str = "linear"
    where: str = "both"
    support: str = "all"
    causal: bool = False

    @property
    def label(self) -> str:
        estimation = "causal" if self.causal else "simultaneous"
        return f"{self.method}, {self.where}, {self.support}, {estimation}"


def variants(default: Config) -> list[Config]:
    """The default and one change at a time."""
    other_support = "range" if default.support == "all" else "all"
    return [
        default,
        replace(default, method="mean"),
        replace(default, where="unet"),
        replace(default, where="text_encoder"),
        replace(default, support=other_support),
        replace(default, causal=True),
    ]


def _scenes(count: int, seed: int, accept) -> list[Record]:
    """The first `count` scenes of seed `seed` that `accept` takes."""
    rng = np.random.default_rng(seed)
    chosen: list[Record] = []
    while len(chosen) < count:
        chosen += [r for r in sample_records(256, int(rng.integers(2**31))) if accept(r)]
    return chosen[:count]


def style_fit_prompts(count: int, colour: str = STYLE_COLOUR) -> tuple[list[str], list[str]]:
    """(source, target): the same captions without a colour word and with "in <colour>"."""
    records = _scenes(count, FIT_SEED, lambda r: True)
    source = [caption(r, seed=i, colours=False) for i, r in enumerate(records)]
    target = [caption(r, seed=i, colour_phrase=colour) for i, r in enumerate(records)]
    return source, target


def _held_out(records: list[Record], count: int, exclude: set[str]) -> list[tuple[Record, str]]:
    """The first `count` (record, caption) pairs whose caption is not in `exclude`."""
    pairs = [(r, caption(r, seed=i)) for i, r in enumerate(records)]
    return [(r, text) for r, text in pairs if text not in exclude][:count]


def style_eval_prompts(
    count: int, colour: str = STYLE_COLOUR, exclude: set[str] = frozenset()
) -> list[tuple[Record, str]]:
    """Held-out captions naming colours, none of them `colour`, none in `exclude` (the
    fitting prompts: a caption does not say where objects are, so scenes can share one)."""
    records = _scenes(2 * count, EVAL_SEED, lambda r: all(o.colour != colour for o in r.objects))
    return _held_out(records, count, exclude)


def _one_of(shape: str):
    return lambda r: len(r.objects) == 2 and sum(o.shape == shape for o in r.objects) == 1


def negation_fit_prompts(count: int, shape: str = NEGATED_SHAPE) -> tuple[list[str], list[str]]:
    """(source, target): captions of a scene with `shape` and one other object, and the same
    captions (same seed, so the same wording) of the scene without it."""
    records = _scenes(count, FIT_SEED, _one_of(shape))
    source = [caption(r, seed=i) for i, r in enumerate(records)]
    target = [caption(r.without(shape), seed=i) for i, r in enumerate(records)]
    return source, target


def negation_eval_prompts(
    count: int, shape: str = NEGATED_SHAPE, exclude: set[str] = frozenset()
) -> list[tuple[Record, str]]:
    """Held-out captions of `shape` and one other object, none in `exclude`."""
    return _held_out(_scenes(2 * count, EVAL_SEED, _one_of(shape)), count, exclude)


def style_scores(images: np.ndarray, records: list[Record], colour: str = STYLE_COLOUR) -> dict:
    """ "styled": images with objects, all of them `colour`; "shapes kept": images whose
    detected shapes are the caption's (as a multiset)."""
    styled = kept = 0
    for image, record in zip(images, records, strict=True):
        found = detect_objects(image)
        styled += bool(found) and all(d.colour == colour for d in found)
        kept += sorted(d.shape for d in found) == sorted(o.shape for o in record.objects)
    return {"styled": styled / len(records), "shapes kept": kept / len(records)}


def negation_scores(images: np.ndarray, records: list[Record], shape: str = NEGATED_SHAPE) -> dict:
    """ "present": images showing `shape`; "others kept": images showing the caption's other
    object with its shape and colour."""
    present = kept = 0
    for image, record in zip(images, records, strict=True):
        found = {(d.shape, d.colour) for d in detect_objects(image)}
        present += any(s == shape for s, _ in found)
        kept += all((o.shape, o.colour) in found for o in record.without(shape).objects)
    return {"present": present / len(records), "others kept": kept / len(records)}


TASKS = {
    "style": (style_fit_prompts, style_eval_prompts, style_scores, Config(support="all")),
    "negation": (
        negation_fit_prompts,
        negation_eval_prompts,
        negation_scores,
        Config(support="range"),
    ),
}


def fit(pipe, config: Config, source: list[str], target: list[str], cache: dict):
    """A transport for `config`; simultaneous fits share one collection over both components
    (the UNet's samples do not depend on the text encoder's maps when nothing is applied)."""
    options = dict(guidance_scale=GUIDANCE, num_inference_steps=STEPS, progress=False)
    if config.causal:
        return act.fit_pipeline(
            pipe, source, target, where=config.where, method=config.method,
            support=config.support, causal=True, batch_size=64, **options,
        )  # fmt: skip
    if "samples" not in cache:
        cache["samples"] = act.collect_pipeline(
            pipe, source, target, where="both", batch_size=64, **options
        )
    transport = cache["samples"].fit(config.method, config.support)
    if config.where == "both":
        return transport
    prefix = "unet." if config.where == "unet" else "text_encoder."
    return transport.subset([s for s in transport.sites if s.startswith(prefix)])


def run_task(pipe, task: str, fit_count: int, count: int, strengths=STRENGTHS) -> list[dict]:
    """Rows of scores (one per configuration and strength) for one task."""
    fit_prompts, eval_prompts, scores, default = TASKS[task]
    source, target = fit_prompts(fit_count)
    held_out = eval_prompts(count, exclude={*source, *target})
    records, prompts = map(list, zip(*held_out, strict=True))
    plain = scores(generate(pipe, prompts), records)  # λ = 0 is the plain pipeline
    rows, cache = [], {}
    for config in variants(default):
        tick = time.perf_counter()
        transport = fit(pipe, config, source, target, cache)
        fit_seconds = time.perf_counter() - tick
        for strength in strengths:
            if strength == 0:
                result = plain
            else:
                with act.steer(pipe, transport, strength=strength):
                    result = scores(generate(pipe, prompts), records)
            rows.append({"task": task, "config": config.label, "strength": strength} | result)
            print(json.dumps(rows[-1] | {"fit s": round(fit_seconds, 1)}), flush=True)
    return rows


def picture_grid(pipe, task: str, path: Path, prompts: int = 6, strengths=STRENGTHS) -> None:
    """Held-out prompts (rows) × strengths (columns) with the task's default configuration,
    one seed per prompt; the prompts are printed."""
    fit_prompts, eval_prompts, _, default = TASKS[task]
    source, target = fit_prompts(256)
    transport = fit(pipe, default, source, target, {})
    chosen = [prompt for _, prompt in eval_prompts(prompts, exclude={*source, *target})]
    columns = []
    for strength in strengths:
        with act.steer(pipe, transport, strength=strength):
            columns.append(generate(pipe, chosen))
    images = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    grid(images, len(strengths), path, scale=4)
    for row, prompt in enumerate(chosen):
        print(f"{path.name} row {row + 1}: {prompt}")


def markdown(rows: list[dict]) -> str:
    """One table per task: configurations × strengths, each cell "metric / metric"."""
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        metrics = [k for k in task_rows[0] if k not in ("task", "config", "strength")]
        strengths = list(dict.fromkeys(row["strength"] for row in task_rows))
        header = " | ".join(f"λ={s:g}" for s in strengths)
        lines += [
            f"| {task}: {' / '.join(metrics)} | {header} |",
            "|---" * (len(strengths) + 1) + "|",
        ]
        for config in dict.fromkeys(row["config"] for row in task_rows):
            cells = [
                " / ".join(f"{row[m]:.0%}" for m in metrics)
                for row in task_rows
                if row["config"] == config
            ]
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="AcT style control and negation, measured")
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--fit-count", type=int, default=256, help="prompts per side")
    parser.add_argument("--count", type=int, default=100, help="evaluation prompts")
    parser.add_argument("--grids", type=Path, help="folder for <task>.png picture grids")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see train.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    rows = []
    for task in args.tasks:
        rows += run_task(pipe, task, args.fit_count, args.count)
        if args.grids:
            args.grids.mkdir(parents=True, exist_ok=True)
            picture_grid(pipe, task, args.grids / f"shapes_{task}.png")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
