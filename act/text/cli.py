"""The command line: `python -m act demo | fit-text | generate | export`.

Bad input (a missing or empty file, a model that cannot be loaded, a transport fitted on
another model, a strength that is not finite) ends with a one-line message on stderr and
exit code 1; malformed arguments (a missing option, a word where a number goes) with exit
code 2. Never a traceback. Every command runs torch on `--threads` threads, 1 by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ..end_to_end import INITS
from ..errors import ActError
from ..maps import END_TO_END, TRANSPORT_METHODS
from .collection import END_TO_END_DEFAULTS
from .export_cli import HELP as EXPORT_HELP
from .export_cli import add_export_command, run_export
from .goals import GOALS, Goal, goal

USAGE_ERROR = 2
END_TO_END_OPTIONS = ("steps", "learning_rate", "sparsity", "init", "seed")
DEFAULT_THREADS = 1
_THREADS_HELP = (
    "CPU threads for torch (default: 1, the fastest measured for SmolLM2 on 2 shared cores; "
    "raise it on a machine with idle cores)"
)
COMMANDS = {
    "demo": "detoxify and steer the built-in SmolLM2 with the shipped sentences",
    "fit-text": "fit a transport from two sentence files",
    "generate": "generate text, steered by a transport",
    "export": EXPORT_HELP,
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def finite(value: float | None, option: str) -> float | None:
    """`value` unless it is NaN or infinite (an ActError naming the option)."""
    if value is not None and not math.isfinite(value):
        raise ActError(f"{option} must be a finite number, got {value!r}")
    return value


def at_least_one(value: int, option: str) -> int:
    """`value` if it is at least 1, else an ActError naming the option."""
    if value < 1:
        raise ActError(f"{option} must be at least 1, got {value}")
    return value


def read_lines(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one sentence or prompt per line)."""
    file = Path(path)
    if not file.is_file():
        raise ActError(f"file {path!r} not found")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ActError(f"cannot read {path!r}: {error}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ActError(f"file {path!r} is empty; it needs one sentence per line")
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m act` and its four commands."""
    listing = "; ".join(f"{name}: {text}" for name, text in COMMANDS.items())
    parser = _Parser(
        prog="python -m act",
        description=f"Activation Transport (AcT) for text. Commands: {listing}.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help=COMMANDS["demo"])
    demo.add_argument("--concept", default="football", help="ocean, football or cooking")
    demo.add_argument("--rows", type=int, default=6, help="prompts shown per table (default: 6)")
    demo.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=_THREADS_HELP)

    fit = commands.add_parser("fit-text", help=COMMANDS["fit-text"])
    _model_arguments(fit)
    fit.add_argument("--source", required=True, help="sentences to move away from, one a line")
    fit.add_argument("--target", required=True, help="sentences to move towards, one a line")
    fit.add_argument(
        "--goal",
        default="concept",
        choices=list(GOALS),
        help="what the transport is for; it picks the defaults of the four options below: "
        f"concept (induction, the default: {_describe(GOALS['concept'])}) or detox "
        f"(mitigation: {_describe(GOALS['detox'])}; support 'range' moves only activations "
        "inside the source's range)",
    )
    fit.add_argument("--layers", help="preset or regex (default: the goal's, the preset llm)")
    fit.add_argument(
        "--method",
        choices=list(TRANSPORT_METHODS),
        help="linear (Linear-AcT), mean (Mean-AcT: a shift), gaussian, or end-to-end (the same "
        "maps trained jointly through the model; slower, for few sentences) (default: the "
        "goal's)",
    )
    fit.add_argument(
        "--pooling",
        choices=["mean", "tokens"],
        help="samples: mean (one per sentence, the mean of its tokens) or tokens (every token "
        "a sample) (default: the goal's)",
    )
    fit.add_argument("--support", help="range, all or qNN, e.g. q05 (default: the goal's)")
    fit.add_argument("--causal", action="store_true", help="estimate layer after layer")
    _end_to_end_arguments(fit)
    fit.add_argument("--out", required=True, help="transport file to write (.safetensors)")

    gen = commands.add_parser("generate", help=COMMANDS["generate"])
    _model_arguments(gen)
    gen.add_argument("--transport", help="transport file from fit-text (omit for plain)")
    gen.add_argument("--strength", type=float, help="default: the file's (usually 1)")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="file with one prompt per line")
    gen.add_argument(
        "--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)"
    )
    gen.add_argument(
        "--seed", type=int, default=0, help="sampling seed, set before each run (default: 0)"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling with temperature > 0: keep the most likely tokens up to this "
        "probability mass (default: 1, all)",
    )
    gen.add_argument("--repetition-penalty", type=float, default=1.2, help="1: none (default: 1.2)")
    gen.add_argument("--chat", action="store_true", help="use the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per line")
    add_export_command(commands)
    return parser


def _describe(chosen: Goal) -> str:
    """A goal's settings in words: "Linear-AcT, mean-pooled samples, support 'all', ..."."""
    pooling = "per-token" if chosen.pooling == "tokens" else "mean-pooled"
    return (
        f"{chosen.method.capitalize()}-AcT, {pooling} samples, support '{chosen.support}', "
        f"layers '{chosen.layers}'"
    )


def _end_to_end_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of method end-to-end (`act.end_to_end.EndToEnd`; the defaults are
    `act.text.collection.END_TO_END_DEFAULTS`)."""
    defaults = END_TO_END_DEFAULTS
    parser.add_argument(
        "--steps", type=int, help=f"end-to-end: optimisation steps (default: {defaults.steps})"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"end-to-end: Adam's step size (default: {defaults.learning_rate:g})",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        help="end-to-end: group-lasso strength that switches units off, 0 for none "
        f"(default: {defaults.sparsity:g})",
    )
    parser.add_argument(
        "--init",
        choices=list(INITS),
        help=f"end-to-end: start from the identity or Linear-AcT's maps (default: {defaults.init})",
    )
    parser.add_argument(
        "--seed", type=int, help="end-to-end: seed of the batches drawn per step (default: 0)"
    )


def end_to_end_settings(args: argparse.Namespace, method: str) -> dict:
    """The end-to-end options given on the command line (an ActError with another method)."""
    given = {
        name: value for name in END_TO_END_OPTIONS if (value := getattr(args, name)) is not None
    }
    if given and method != END_TO_END:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise ActError(f"{flags} apply to --method end-to-end only, not to {method}")
    finite(given.get("learning_rate"), "--learning-rate")
    finite(given.get("sparsity"), "--sparsity")
    return given


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a path")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sentences per forward pass (default: 16)"
    )
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help=_THREADS_HELP)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        listing = "\n".join(f"  {name:<9} {text}" for name, text in COMMANDS.items())
        print(
            f"usage: python -m act COMMAND [options]\n\ncommands:\n{listing}\n\n"
            "python -m act COMMAND --help shows a command's options.",
            file=sys.stderr,
        )
        return USAGE_ERROR
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        import torch

        torch.set_num_threads(at_least_one(args.threads, "--threads"))
        _quiet_transformers()
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.concept, args.rows)
        elif args.command == "fit-text":
            fit_text_command(args)
        elif args.command == "export":
            run_export(args)
        else:
            generate_command(args)
    except (ActError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"python -m act {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def fit_text_command(args: argparse.Namespace) -> None:
    """`fit-text`: read both files, fit, save; prints a summary."""
    from ..maps import Support
    from .collection import fit_text
    from .models import load_causal_lm

    source, target = read_lines(args.source), read_lines(args.target)
    chosen = goal(args.goal)
    options = chosen.options()
    options.update({name: value for name in options if (value := getattr(args, name)) is not None})
    support = options["support"]
    Support.parse(support)
    options.update(end_to_end_settings(args, options["method"]))
    if args.causal and options["method"] == END_TO_END:
        raise ActError(
            "--causal does not apply to --method end-to-end (it trains every layer jointly)"
        )
    at_least_one(args.batch_size, "--batch-size")
    if not args.out.endswith(".safetensors"):
        raise ActError(f"--out {args.out!r} must end with .safetensors")
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    start = time.perf_counter()
    transport = fit_text(
        model, tokenizer, source, target, **options, causal=args.causal,
        batch_size=args.batch_size,
        info={"model": args.model, "source": args.source, "target": args.target,
              "goal": chosen.name},
    )  # fmt: skip
    transport.save(args.out)
    print(transport.summary())
    if transport.method == END_TO_END:
        loss = transport.info[END_TO_END]["loss"]
        print(
            f"loss (summed W2^2 / scale^2 over layers): plain model {loss['plain']:.4g}, "
            f"start {loss['start']:.4g}, fitted {loss['fitted']:.4g}"
        )
    print(f"fitted in {time.perf_counter() - start:.1f} s; saved {args.out}")


def generate_command(args: argparse.Namespace) -> None:
    """`generate`: steer the model with the transport and print every continuation."""
    from ..steering import steer
    from ..transport import Transport
    from .generation import Sampling, generate
    from .models import load_causal_lm

    prompts = [args.prompt] if args.prompt is not None else read_lines(args.prompts)
    if not prompts[0].strip():
        raise ActError("--prompt is empty: give the text to continue or to answer")
    for value, option in (
        (args.strength, "--strength"),
        (args.temperature, "--temperature"),
        (args.top_p, "--top-p"),
        (args.repetition_penalty, "--repetition-penalty"),
    ):
        finite(value, option)
    at_least_one(args.max_new_tokens, "--max-new-tokens")
    at_least_one(args.batch_size, "--batch-size")
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, chat=args.chat,
        batch_size=args.batch_size,
    )  # fmt: skip
    transport = Transport.load(args.transport) if args.transport else None
    if transport is None and args.strength is not None:
        raise ActError("--strength needs --transport")
    strength = 0.0 if transport is None else args.strength
    if transport is not None and strength is None:
        strength = transport.default_strength
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    if transport is None:
        outputs = generate(model, tokenizer, prompts, sampling)
    else:
        with steer(model, transport, strength):
            outputs = generate(model, tokenizer, prompts, sampling)
    for prompt, output in zip(prompts, outputs, strict=True):
        if args.json:
            record = {"prompt": prompt, "strength": strength, "output": output}
            print(json.dumps({**record, "model": args.model, "seed": args.seed}))
        else:
            print(f"> {prompt}\n{output.strip()}\n")


def _quiet_transformers() -> None:
    """Hide transformers' progress bars and advice; our own messages stay."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
