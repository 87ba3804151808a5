"""Exporting a steered causal LM as a plain transformers folder.

The transport is folded into the weights (`act.bake`) and the model saved with
`save_pretrained` (safetensors): `AutoModelForCausalLM.from_pretrained(folder)` loads it
with no AcT code, so any engine that serves the architecture serves the steered model. A
hooked Linear layer without a bias (Llama's `o_proj`) gets one through the architecture's
own config switch (`attention_bias`, `mlp_bias`), with zero biases in the other layers the
switch covers, never through a custom class. Maps with support bounds and RMSNorm outputs
(no bias) do not fold and are refused with the reason.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..baking import bake
from ..errors import ActError
from ..export import check_target, refuse_bounds
from ..hooks import check_fingerprint, resolve_module, split_site
from ..maps import checked_strength
from ..transport import Transport

# config switches that give an architecture's Linear layers biases (Llama, Mistral, Qwen3...)
BIAS_SWITCHES = ("attention_bias", "mlp_bias")
REMEDY = (
    "refit it with support 'all' (python -m act fit-text ... --support all) to export it, "
    "or steer with hooks (python -m act generate)"
)


@dataclass(frozen=True)
class CausalLMExport:
    """What `export_causal_lm` wrote: the folder, the strength and the config switches set."""

    path: Path
    strength: float
    bias_switches: list[str]

    def summary(self, modules: int) -> str:
        """One line for people."""
        switches = ", ".join(f"{name}=True" for name in self.bias_switches)
        added = f"; config {switches} (zero biases elsewhere)" if switches else ""
        return (
            f"wrote {self.path}: {modules} modules folded at strength {self.strength:g}{added}; "
            "it loads with AutoModelForCausalLM.from_pretrained"
        )


def export_causal_lm(
    model: Any,
    tokenizer: Any,
    transport: Transport,
    out: str | Path,
    strength: float = 1.0,
    *,
    overwrite: bool = False,
) -> CausalLMExport:
    """Save `model` steered by `transport` at `strength` as a plain transformers folder.

    The folder is written atomically: a temporary folder next to `out`, renamed into place.
    The model is left as it was (weights, biases and config restored bit for bit).

    Args:
        model: a transformers causal LM (e.g. from `act.text.load_causal_lm`).
        tokenizer: saved with it.
        transport: maps with support "all" on Linear or LayerNorm outputs.
        out: the folder to write.
        strength: as in `act.steer`.
        overwrite: replace an existing folder.

    Raises:
        ActError: the strength is not finite; `out` exists without `overwrite`, or cannot be
            written; the transport has support bounds, was fitted on another model, or hooks
            a module that cannot hold its map (named, with the reason). Nothing is written.
    """
    strength = checked_strength(strength)
    target = check_target(out, overwrite)
    if target.exists() and not target.is_dir():
        raise ActError(f"{str(target)!r} is a file, not a model folder; choose another folder")
    refuse_bounds(transport, REMEDY)
    if transport.module_params:
        check_fingerprint(model, transport.module_params, transport.model_class)
    with _biases_for(model, transport) as switches, bake(model, transport, strength):
        _save_folder(model, tokenizer, target)
    return CausalLMExport(target, strength, switches)


@contextlib.contextmanager
def _biases_for(model: Any, transport: Transport) -> Iterator[list[str]]:
    """While open, the model has the biases its hooked Linear layers lack, added through
    config switches (zero biases); yields the switches set. **Mutates** the model and its
    config until the block ends, then restores both."""
    needed = [
        name
        for name in dict.fromkeys(split_site(site)[0] for site in transport.sites)
        if lacks_bias(resolve_module(model, name))
    ]
    if not needed:
        yield []
        return
    switches, names = _bias_switches(model, needed)
    config = model.config
    saved = {switch: getattr(config, switch) for switch in switches}
    try:
        with zero_biases([model.get_submodule(name) for name in sorted(names)]):
            for switch in switches:
                setattr(config, switch, True)
            _check_loadable(model)
            yield switches
    finally:
        for switch, value in saved.items():
            setattr(config, switch, value)


@contextlib.contextmanager
def zero_biases(modules: list[nn.Module]) -> Iterator[None]:
    """While open, every Linear among `modules` that has no bias has a zero one (same dtype,
    device and `requires_grad` as its weight). **Mutates** them until the block ends."""
    added: list[nn.Linear] = []
    try:
        for module in modules:
            if lacks_bias(module):
                weight = module.weight
                module.bias = nn.Parameter(
                    torch.zeros(module.out_features, dtype=weight.dtype, device=weight.device),
                    requires_grad=weight.requires_grad,
                )
                added.append(module)
        yield
    finally:
        for module in added:
            module.bias = None


def lacks_bias(module: nn.Module) -> bool:
    """Whether `module` is a Linear layer without a bias."""
    return isinstance(module, nn.Linear) and module.bias is None


def _bias_switches(model: Any, needed: list[str]) -> tuple[list[str], set[str]]:
    """(config switches that give every `needed` module a bias, every Linear they give one)."""
    config = model.config
    chosen: list[str] = []
    names: set[str] = set()
    for switch in BIAS_SWITCHES:
        if getattr(config, switch, None) is not False:
            continue
        given = _linear_with_bias(_skeleton(model, {switch: True}))
        if given & set(needed):
            chosen.append(switch)
            names |= given
    uncovered = [name for name in needed if name not in names]
    if uncovered:
        offered = [s for s in BIAS_SWITCHES if hasattr(config, s)]
        raise ActError(
            f"module {uncovered[0]!r} (Linear) has no bias, so the shift of the map has nowhere "
            f"to go, and {type(config).__name__} has no switch that adds one"
            + (f" (it offers {', '.join(offered)}, which do not cover it)" if offered else "")
            + "; choose layers with a bias, or steer with hooks (python -m act generate)"
        )
    return chosen, names


def _skeleton(model: Any, changes: dict[str, Any]) -> nn.Module:
    """A weightless copy of the model's architecture (meta device) with config `changes`."""
    config = type(model.config).from_dict({**model.config.to_dict(), **changes})
    with torch.device("meta"):
        return type(model)(config)


def _linear_with_bias(model: nn.Module) -> set[str]:
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None
    }


def _check_loadable(model: Any) -> None:
    """Raise unless a fresh model of the (changed) config has exactly the model's tensors,
    so that `from_pretrained` loads the saved folder with nothing missing or left over."""
    fresh = {k: tuple(v.shape) for k, v in _skeleton(model, {}).state_dict().items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if fresh != own:
        differ = sorted(set(fresh) ^ set(own)) or [k for k in own if own[k] != fresh[k]]
        raise ActError(
            f"with its bias switches, {type(model).__name__} would not load its own tensors "
            f"back (they differ at {differ[:3]}); steer it with hooks instead"
        )


def _save_folder(model: Any, tokenizer: Any, target: Path) -> None:
    """`save_pretrained` into a temporary folder next to `target`, then renamed over it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as error:
        raise ActError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
    try:
        temporary.chmod(0o755)
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        _replace_folder(temporary, target)
    except OSError as error:
        raise ActError(f"cannot write {str(target)!r}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed once
    `new` is in place (put back if that fails)."""
    if not target.exists():
        new.rename(target)
        return
    old = target.parent / f".{target.name}.{secrets.token_hex(4)}.old"
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
