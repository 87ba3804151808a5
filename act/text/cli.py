"""The command line: `python -m act demo | fit-text | generate`.

Bad input (a missing or empty file, a transport fitted on another model, a strength that is
not a number) ends with a one-line message on stderr and a non-zero exit code, never a
traceback.
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

from ..errors import ActError

USAGE_ERROR = 2
_THREADS_HELP = "CPU threads for torch; 1 is fastest for small models on shared cores"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
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
    """The parser of `python -m act` and its three commands."""
    parser = _Parser(prog="python -m act", description="Activation Transport (AcT) for text.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="detoxify and steer the built-in SmolLM2")
    demo.add_argument("--concept", default="football", help="ocean, football or cooking")
    demo.add_argument("--rows", type=int, default=6, help="prompts shown per table")
    demo.add_argument("--threads", type=int, default=1, help=_THREADS_HELP + " (default: 1)")

    fit = commands.add_parser("fit-text", help="fit a transport from two sentence files")
    _model_arguments(fit)
    fit.add_argument("--source", required=True, help="sentences to move away from, one a line")
    fit.add_argument("--target", required=True, help="sentences to move towards, one a line")
    fit.add_argument("--layers", default="llm", help="preset (default: llm) or regex")
    fit.add_argument("--method", default="linear", choices=["linear", "mean", "gaussian"])
    fit.add_argument("--support", default="range", help="range, all or qNN (e.g. q05)")
    fit.add_argument("--causal", action="store_true", help="estimate layer after layer")
    fit.add_argument("--out", required=True, help="transport file to write (.safetensors)")

    gen = commands.add_parser("generate", help="generate text, steered by a transport")
    _model_arguments(gen)
    gen.add_argument("--transport", help="transport file from fit-text (omit for plain)")
    gen.add_argument("--strength", type=finite_float, help="default: the file's (usually 1)")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="file with one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=40)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=finite_float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=finite_float, default=1.0)
    gen.add_argument("--repetition-penalty", type=finite_float, default=1.2)
    gen.add_argument("--chat", action="store_true", help="use the chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a path")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, help=_THREADS_HELP + " (default: torch's)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ActError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        _quiet_transformers()
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.concept, args.rows)
        elif args.command == "fit-text":
            fit_text_command(args)
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
    Support.parse(args.support)
    if not args.out.endswith(".safetensors"):
        raise ActError(f"--out {args.out!r} must end with .safetensors")
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    start = time.perf_counter()
    transport = fit_text(
        model, tokenizer, source, target,
        layers=args.layers, method=args.method, support=args.support, causal=args.causal,
        batch_size=args.batch_size,
        info={"model": args.model, "source": args.source, "target": args.target},
    )  # fmt: skip
    transport.save(args.out)
    print(transport.summary())
    print(f"fitted in {time.perf_counter() - start:.1f} s; saved {args.out}")


def generate_command(args: argparse.Namespace) -> None:
    """`generate`: steer the model with the transport and print every continuation."""
    from ..steering import steer
    from ..transport import Transport
    from .generation import Sampling, generate
    from .models import load_causal_lm

    prompts = [args.prompt] if args.prompt is not None else read_lines(args.prompts)
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
