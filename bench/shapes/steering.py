"""AcT on the shapes-world model, measured the way artists use it.

**Style control.** Fit on captions that name colours (source) vs the same captions with every
colour word "red" (target): paired captions of the kind the evaluation uses. Generate held-out
captions that name other colours and count the images whose objects all turned red
("styled"), and the images whose shapes are still the caption's ("shapes kept", the analogue
of the paper's CLIP score).

**Concept negation.** Fit on captions of two-object scenes, one a triangle (source), vs the
same captions with the triangle left out (target); generate held-out captions with a
triangle and count the images that still show one ("present"), and the images that keep the
other object with its shape and colour ("others kept").

**Ceilings.** Content is reported relative to what the model does when the prompt itself
asks for the change: the held-out scenes captioned in red (style), or without the triangle
(negation). "kept / ceiling" = 100% means steering keeps content as well as prompting does.

Each task runs a default configuration and one change at a time (pooling, guidance branch,
method, components, support, a step window for the UNet maps), over λ = 0 … 1.5, sampled
with guidance 5 (as SD users sample). Fitting prompts (scene seed 2), the prompts defaults
were chosen on (`--prompts tuning`, scene seed 4) and the reported prompts (scene seed 3)
never share a scene, and none is a training scene (seed 0).

    python -m bench.shapes.steering --count 48 --grids docs/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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

# Denser where each task's curve bends (measured on the tuning prompts).
STRENGTHS = {
    "style": (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5),
    "negation": (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 1.0, 1.5),
}
FIT_SEED = 2
EVAL_SEEDS = {"report": 3, "tuning": 4}
STYLE_COLOUR = "red"
NEGATED_SHAPE = "triangle"


@dataclass(frozen=True)
class Config:
    """How a transport is fitted and applied."""

    method: str = "linear"
    where: str = "both"
    support: str = "all"
    pooling: str = "tokens"
    cond_only: bool = True
    unet_steps: tuple[float, float] = (0.0, 1.0)
    causal: bool = False
    fit_count: int | None = None  # prompts per side; None: the run's --fit-count
    layers: str | None = None  # a preset of `act.PRESETS`; None: fit_pipeline's default
    end_to_end: act.EndToEnd | None = None  # method "end-to-end": its settings (None: defaults)

    @property
    def label(self) -> str:
        parts = [
            self.method,
            self.where,
            self.support,
            "per-token" if self.pooling == "tokens" else "pooled",
            "cond branch" if self.cond_only else "both branches",
        ]
        if self.unet_steps != (0.0, 1.0):
            parts.append(f"UNet steps {self.unet_steps[0]:g}–{self.unet_steps[1]:g}")
        if self.causal:
            parts.append("causal")
        if self.end_to_end is not None:
            chosen = self.end_to_end
            parts.append(f"{chosen.steps} steps, lr {chosen.learning_rate:g}")
            if chosen.sparsity:
                parts.append(f"sparsity {chosen.sparsity:g}")
        if self.fit_count is not None:
            parts.append(f"from {self.fit_count} + {self.fit_count}")
        if self.layers is not None:
            parts.append(f"layers {self.layers}")
        return ", ".join(parts)


def variants(default: Config) -> list[Config]:
    """The default and one change at a time."""
    return [
        default,
        replace(default, pooling="mean" if default.pooling == "tokens" else "tokens"),
        replace(default, cond_only=not default.cond_only),
        replace(default, pooling="mean", cond_only=False),  # the paper's choices
        replace(default, method="mean"),
        replace(default, where="unet"),
        replace(default, where="text_encoder"),
        replace(default, support="range" if default.support == "all" else "all"),
        replace(default, unet_steps=(0.0, 0.5)),
    ]


def fit_comparison(
    default: Config, few: int = 32, end_to_end: act.EndToEnd | None = None
) -> list[Config]:
    """The default from the run's prompts, and from `few` + `few` prompts: closed form,
    causal, and end to end (with `end_to_end`'s settings; None: the defaults)."""
    return [
        default,
        replace(default, fit_count=few),
        replace(default, causal=True, fit_count=few),
        replace(default, method="end-to-end", fit_count=few, end_to_end=end_to_end),
    ]


def layer_comparison(default: Config, layers: str) -> list[Config]:
    """The default against Linear-AcT with support "all" on the preset `layers` (e.g.
    "exportable": the sites that fold into a LoRA file), on the conditional branch and on
    both (as a LoRA steers), and Mean-AcT there on both branches."""
    chosen = replace(default, layers=layers, support="all")
    both = replace(chosen, cond_only=False)
    return [default, chosen, both, replace(both, method="mean")]


def _scenes(count: int, seed: int, accept) -> list[Record]:
    """The first `count` scenes of seed `seed` that `accept` takes."""
    rng = np.random.default_rng(seed)
    chosen: list[Record] = []
    while len(chosen) < count:
        chosen += [r for r in sample_records(256, int(rng.integers(2**31))) if accept(r)]
    return chosen[:count]


def _without_colour(colour: str):
    return lambda r: all(o.colour != colour for o in r.objects)


def style_fit_prompts(count: int, colour: str = STYLE_COLOUR) -> tuple[list[str], list[str]]:
    """(source, target): captions naming the scene's colours (none `colour`), and the same
    captions (same seed, so the same wording) with every object `colour`."""
    records = _scenes(count, FIT_SEED, _without_colour(colour))
    source = [caption(r, seed=i) for i, r in enumerate(records)]
    target = [caption(r.recoloured(colour), seed=i) for i, r in enumerate(records)]
    return source, target


def _held_out(records: list[Record], count: int, exclude: set[str]) -> list[tuple[Record, str]]:
    """The first `count` (record, caption) pairs whose caption is not in `exclude`."""
    pairs = [(r, caption(r, seed=i)) for i, r in enumerate(records)]
    return [(r, text) for r, text in pairs if text not in exclude][:count]


def style_eval_prompts(
    count: int,
    colour: str = STYLE_COLOUR,
    exclude: set[str] = frozenset(),
    prompts: str = "report",
) -> list[tuple[Record, str]]:
    """Held-out captions naming colours, none of them `colour`, none in `exclude` (the
    fitting prompts: a caption does not say where objects are, so scenes can share one)."""
    records = _scenes(2 * count, EVAL_SEEDS[prompts], _without_colour(colour))
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
    count: int,
    shape: str = NEGATED_SHAPE,
    exclude: set[str] = frozenset(),
    prompts: str = "report",
) -> list[tuple[Record, str]]:
    """Held-out captions of `shape` and one other object, none in `exclude`."""
    return _held_out(_scenes(2 * count, EVAL_SEEDS[prompts], _one_of(shape)), count, exclude)


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


@dataclass(frozen=True)
class Task:
    """A task's prompts, scores and default, and what its ceiling prompt asks for."""

    fit_prompts: object
    eval_prompts: object
    scores: object
    prompted: object  # record -> the scene the prompt would ask for
    content: str  # the score kept relative to the ceiling
    default: Config
    strengths: tuple[float, ...]


TASKS = {
    "style": Task(
        style_fit_prompts,
        style_eval_prompts,
        style_scores,
        lambda r: r.recoloured(STYLE_COLOUR),
        "shapes kept",
        Config(support="all"),
        STRENGTHS["style"],
    ),
    "negation": Task(
        negation_fit_prompts,
        negation_eval_prompts,
        negation_scores,
        lambda r: r.without(NEGATED_SHAPE),
        "others kept",
        Config(support="range"),
        STRENGTHS["negation"],
    ),
}


def fit(pipe, config: Config, source: list[str], target: list[str], cache: dict):
    """A transport for `config`; simultaneous fits of one pooling share one collection over
    both components (the UNet's samples do not depend on the text encoder's maps when
    nothing is applied)."""
    options = dict(guidance_scale=GUIDANCE, num_inference_steps=STEPS, progress=False)
    if config.method == "end-to-end":
        return act.fit_pipeline(
            pipe, source, target, where=config.where, method="end-to-end",
            support=config.support, pooling=config.pooling, batch_size=64,
            end_to_end=config.end_to_end, **options,
        )  # fmt: skip
    if config.causal:
        return act.fit_pipeline(
            pipe, source, target, where=config.where, method=config.method,
            support=config.support, causal=True, pooling=config.pooling, batch_size=64,
            **options,
        )  # fmt: skip
    key = (config.pooling, len(source), config.layers)
    if key not in cache:
        cache[key] = act.collect_pipeline(
            pipe, source, target, where="both", layers=config.layers, pooling=config.pooling,
            batch_size=64, **options,
        )  # fmt: skip
    transport = cache[key].fit(config.method, config.support)
    if config.where == "both":
        return transport
    prefix = "unet." if config.where == "unet" else "text_encoder."
    return transport.subset([s for s in transport.sites if s.startswith(prefix)])


@contextmanager
def steered(pipe, transport, config: Config, strength: float) -> Iterator[None]:
    """Steer as `config` says: the UNet maps in its step window, the text encoder's always
    (they condition every step)."""
    with ExitStack() as stack:
        parts = {"": transport}
        if config.unet_steps != (0.0, 1.0):
            unet = [s for s in transport.sites if s.startswith("unet.")]
            others = [s for s in transport.sites if not s.startswith("unet.")]
            parts = {"": transport.subset(others)} if others else {}
            parts["steps"] = transport.subset(unet)
        for key, part in parts.items():
            steps = config.unet_steps if key == "steps" else (0.0, 1.0)
            stack.enter_context(
                act.steer(pipe, part, strength=strength, steps=steps, cond_only=config.cond_only)
            )
        yield


def ceiling(pipe, task: str, records: list[Record]) -> dict:
    """The task's scores when the held-out scenes are prompted with the change itself."""
    spec = TASKS[task]
    wanted = [spec.prompted(r) for r in records]
    prompts = [caption(r, seed=i) for i, r in enumerate(wanted)]
    return spec.scores(generate(pipe, prompts), records)


def run_task(
    pipe,
    task: str,
    fit_count: int,
    count: int,
    strengths: tuple[float, ...] | None = None,
    prompts: str = "report",
    configs: list[Config] | None = None,
) -> list[dict]:
    """Rows of scores (one per configuration and strength) for one task, the first row the
    prompted ceiling; each row's content score is also given relative to the ceiling."""
    spec = TASKS[task]
    source, target = spec.fit_prompts(fit_count)
    held_out = spec.eval_prompts(count, exclude={*source, *target}, prompts=prompts)
    records, texts = map(list, zip(*held_out, strict=True))
    best = ceiling(pipe, task, records)
    rows = [{"task": task, "config": "prompted (ceiling)", "strength": None} | best]
    print(json.dumps(rows[-1]), flush=True)
    plain = spec.scores(generate(pipe, texts), records)  # λ = 0 is the plain pipeline
    cache: dict = {}
    for config in configs or variants(spec.default):
        few = config.fit_count or fit_count
        tick = time.perf_counter()
        transport = fit(pipe, config, source[:few], target[:few], cache)
        fit_seconds = time.perf_counter() - tick
        for strength in strengths or spec.strengths:
            if strength == 0:
                result = plain
            else:
                with steered(pipe, transport, config, strength):
                    result = spec.scores(generate(pipe, texts), records)
            relative = result[spec.content] / max(best[spec.content], 1e-9)
            rows.append(
                {"task": task, "config": config.label, "strength": strength}
                | result
                | {"kept / ceiling": relative}
            )
            print(json.dumps(rows[-1] | {"fit s": round(fit_seconds, 1)}), flush=True)
    return rows


def picture_grid(pipe, task: str, path: Path, prompts: int = 6) -> None:
    """Reported held-out prompts (rows) × strengths (columns) with the task's default
    configuration, one seed per prompt; the prompts are printed."""
    spec = TASKS[task]
    source, target = spec.fit_prompts(256)
    transport = fit(pipe, spec.default, source, target, {})
    chosen = [prompt for _, prompt in spec.eval_prompts(prompts, exclude={*source, *target})]
    columns = []
    for strength in spec.strengths:
        with steered(pipe, transport, spec.default, strength):
            columns.append(generate(pipe, chosen))
    images = np.stack(columns, axis=1).reshape(-1, *columns[0].shape[1:])
    grid(images, len(spec.strengths), path, scale=4)
    for row, prompt in enumerate(chosen):
        print(f"{path.name} row {row + 1}: {prompt}")


def markdown(rows: list[dict]) -> str:
    """One table per task: configurations × strengths, each cell "change / content (content
    relative to the prompted ceiling)"; the ceiling is said above the table."""
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        best = next(row for row in task_rows if row["strength"] is None)
        task_rows = [row for row in task_rows if row["strength"] is not None]
        change, content = [k for k in best if k not in ("task", "config", "strength")]
        strengths = list(dict.fromkeys(row["strength"] for row in task_rows))
        header = " | ".join(f"λ={s:g}" for s in strengths)
        lines += [
            f"Prompted ceiling ({task}): {change} {best[change]:.0%}, {content} "
            f"{best[content]:.0%}.",
            "",
            f"| {task}: {change} / {content} (of ceiling) | {header} |",
            "|---" * (len(strengths) + 1) + "|",
        ]
        for config in dict.fromkeys(row["config"] for row in task_rows):
            cells = [
                f"{row[change]:.0%} / {row[content]:.0%} ({row['kept / ceiling']:.0%})"
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
    parser.add_argument("--count", type=int, default=48, help="evaluation prompts")
    parser.add_argument(
        "--prompts",
        choices=list(EVAL_SEEDS),
        default="report",
        help="'tuning': the prompts defaults are chosen on; 'report': the reported ones",
    )
    parser.add_argument("--strengths", type=float, nargs="+", help="default: the task's own")
    parser.add_argument("--grids", type=Path, help="folder for <task>.png picture grids")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see train.py)")
    parser.add_argument(
        "--compare-fits",
        action="store_true",
        help="instead of the variants: the default from --fit-count prompts against Linear-AcT, "
        "causal and end-to-end fits from 32 + 32",
    )
    parser.add_argument(
        "--layers",
        help="instead of the variants: the default against Linear-AcT and Mean-AcT with "
        "support 'all' on this preset's layers (e.g. 'exportable')",
    )
    parser.add_argument("--steps", type=int, help="--compare-fits: end-to-end steps (default 50)")
    parser.add_argument("--learning-rate", type=float, help="--compare-fits: end-to-end rate")
    parser.add_argument("--sparsity", type=float, help="--compare-fits: end-to-end sparsity")
    parser.add_argument(
        "--end-to-end-only",
        action="store_true",
        help="--compare-fits: only the end-to-end fit (the closed-form rows repeat exactly)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    rows = []
    for task in args.tasks:
        strengths = tuple(args.strengths) if args.strengths else None
        chosen = {
            "steps": args.steps, "learning_rate": args.learning_rate, "sparsity": args.sparsity
        }  # fmt: skip
        settings = act.EndToEnd(**{k: v for k, v in chosen.items() if v is not None})
        configs = None
        if args.compare_fits:
            configs = fit_comparison(TASKS[task].default, end_to_end=settings)
            configs = configs[-1:] if args.end_to_end_only else configs
        elif args.layers:
            configs = layer_comparison(TASKS[task].default, args.layers)
        rows += run_task(pipe, task, args.fit_count, args.count, strengths, args.prompts, configs)
        if args.grids:
            args.grids.mkdir(parents=True, exist_ok=True)
            picture_grid(pipe, task, args.grids / f"shapes_{task}.png")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
