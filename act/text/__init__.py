"""Text front end: causal LMs from transformers.

Loading models offline (`models`: folders, GGUF files, the built-in SmolLM2), where to hook
them (`presets`, registered in `act.PRESETS`), collecting and fitting from sentences
(`collection`), generation and perplexity (`generation`), exports (`export`: transformers
folders; `gguf_export`: GGUF checkpoints and control vectors for llama.cpp), the shipped
prompt sets (`data`), and the command line `python -m act` with its demo (`cli`,
`export_cli`, `demo`).

May import: the core (`act.*` top-level modules), torch, numpy, transformers, tqdm and gguf;
transformers only inside functions, so that importing this package stays cheap. Never
imports the diffusers front end or ComfyUI.
"""

from . import presets  # noqa: F401  (registers the LM presets, e.g. "llm")
from .collection import collect_text, encode, fit_text
from .generation import Sampling, generate, perplexity, sweep
from .models import BUILTIN, load_causal_lm

__all__ = [
    "BUILTIN",
    "Sampling",
    "collect_text",
    "encode",
    "fit_text",
    "generate",
    "load_causal_lm",
    "perplexity",
    "sweep",
]
