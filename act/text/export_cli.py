"""`python -m act export`: a transport folded into a transformers folder or a GGUF checkpoint,
or written as a llama.cpp control vector."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ActError
from ..export import check_target, refuse_bounds
from ..transport import Transport
from .export import REMEDY, export_causal_lm
from .gguf_export import (
    CONTROL_VECTOR_REMEDY,
    GGUF_TYPES,
    export_control_vector,
    export_gguf,
)

COMMAND = "export"
FORMATS = ("folder", "gguf", "control-vector")
HELP = (
    "write the model with a transport folded into its weights (a transformers folder or a "
    "GGUF for llama.cpp), or the transport as a llama.cpp control vector"
)


def add_export_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `export` to the subcommands of `python -m act`."""
    parser = subparsers.add_parser(COMMAND, help=HELP)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a path")
    parser.add_argument("--transport", required=True, help="transport file from fit-text")
    parser.add_argument("--strength", type=float, help="default: the file's (usually 1)")
    parser.add_argument(
        "--out", required=True, help="folder (a transformers model) or .gguf file to write"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="folder (default), gguf (default when --out ends with .gguf; needs a GGUF "
        "--model), or control-vector (Mean-AcT on block outputs, for llama.cpp "
        "--control-vector)",
    )
    parser.add_argument(
        "--gguf-type",
        choices=GGUF_TYPES,
        help="gguf: keep the untouched tensors as they are (default), or convert all to f32/f16",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    return parser


def run_export(args: argparse.Namespace) -> None:
    """`export`: load the model and the transport, fold or convert, write; prints what was
    written. Everything that can be checked before loading the model is checked first."""
    from .models import gguf_source, load_causal_lm

    if args.strength is not None and not math.isfinite(args.strength):
        raise ActError(f"--strength must be a finite number, got {args.strength!r}")
    kind = args.format or ("gguf" if str(args.out).endswith(".gguf") else "folder")
    if args.gguf_type is not None and kind != "gguf":
        raise ActError(f"--gguf-type is for --format gguf, and the format is {kind!r}")
    transport = Transport.load(args.transport)
    strength = transport.default_strength if args.strength is None else args.strength
    check_target(args.out, args.overwrite, suffix=None if kind == "folder" else ".gguf")
    refuse_bounds(transport, CONTROL_VECTOR_REMEDY if kind == "control-vector" else REMEDY)
    source = gguf_source(args.model)
    if kind == "gguf" and source is None:
        raise ActError(
            f"--format gguf starts from the GGUF file the model is loaded from, and "
            f"{args.model!r} is not one; give a .gguf --model, or export a folder and convert "
            "it with llama.cpp's convert_hf_to_gguf.py"
        )
    model, tokenizer = load_causal_lm(args.model, device=args.device)
    if kind == "gguf":
        written = export_gguf(
            model,
            transport,
            source,
            args.out,
            strength,
            tensor_type=args.gguf_type or "keep",
            overwrite=args.overwrite,
        )
        print(written.summary())
    elif kind == "control-vector":
        written = export_control_vector(
            model, transport, args.out, strength, overwrite=args.overwrite
        )
        print(f"{written.summary()}; use it with llama.cpp: --control-vector {args.out}")
    else:
        folder = export_causal_lm(
            model, tokenizer, transport, args.out, strength, overwrite=args.overwrite
        )
        print(folder.summary(len(transport.maps)))
