"""ComfyUI's text encoder (CLIP object): encoding prompt batches, real-token masks, steering.

Steering patches `<module>.forward` through the CLIP patcher's object patches, so the module
tree stays intact (weight patches such as LoRAs on the same module still apply) and the
input CLIP is never modified. Each patch chains to the previous clone's patch of that key.
"""

from __future__ import annotations

from typing import Any

import torch

from ..act import Transport
from ..act.hooks import check_fingerprint, check_width, group_by_module, pick_output, replace_output
from ..act.maps import Coefficients, ModuleMap
from ..act.steering import transported

PREFIX = "clip"


def token_key(site: str) -> str:
    """The tokenizer key of a text-encoder site: `clip_l.…` -> "l", `t5xxl.…` -> "t5xxl"."""
    encoder = site.split(".", 1)[0]
    return encoder[len("clip_") :] if encoder.startswith("clip_") else encoder


def real_token_masks(clip: Any, tokens: dict[str, list]) -> dict[str, torch.Tensor]:
    """Per tokenizer key, a (sections, length) mask of real tokens.

    ComfyUI's tokenizers pad after the end token (or before the first token with `pad_left`).
    Real tokens run from the first non-padding token up to and including the first end
    token; a tokenizer without an end token (Qwen3, Qwen2.5-VL: padded to a minimum length)
    ends its real tokens before the trailing run of its pad token.
    """
    masks = {}
    for key, sections in tokens.items():
        tokenizer = getattr(clip.tokenizer, f"clip_{key}", None) or getattr(
            clip.tokenizer, key, None
        )
        rows = [
            _real_token_row([_token_id(item) for item in section], tokenizer)
            for section in sections
        ]
        masks[key] = torch.tensor(rows)
    return masks


def _real_token_row(ids: list[int], tokenizer: Any) -> list[float]:
    end = getattr(tokenizer, "end_token", None)
    pad = getattr(tokenizer, "pad_token", None)
    start, stop = 0, len(ids)
    if getattr(tokenizer, "pad_left", False):
        while start < stop - 1 and ids[start] == pad:
            start += 1
    if end is not None and end in ids[start:]:
        stop = ids.index(end, start) + 1
    elif pad is not None and not getattr(tokenizer, "pad_left", False):
        while stop > start + 1 and ids[stop - 1] == pad:
            stop -= 1
    return [0.0] * start + [1.0] * (stop - start) + [0.0] * (len(ids) - stop)


def _token_id(item: Any) -> int:
    """A token's id; -1 for embeddings (textual inversions are tensors, not ids)."""
    token = item[0] if isinstance(item, tuple | list) else item
    return token if isinstance(token, int) else -1


def encode_tokens(clip: Any, tokens: dict) -> dict[str, Any]:
    """Encode tokenized text: {"cond": (1, T, D), "pooled_output": (1, D), ...}."""
    return clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)


def batch_conditioning(encoded: list[dict[str, Any]]) -> list[list]:
    """CONDITIONING for a batch of encoded prompts of equal token length."""
    encoded = [dict(item) for item in encoded]
    conds = [item.pop("cond") for item in encoded]
    lengths = {cond.shape[1] for cond in conds}
    if len(lengths) > 1:
        raise ValueError(f"prompts of different token lengths {sorted(lengths)} in one batch")
    extras = {}
    for key, first in encoded[0].items():
        values = [item[key] for item in encoded]
        batched = all(isinstance(v, torch.Tensor) and v.shape[:1] == (1,) for v in values)
        extras[key] = torch.cat(values) if batched else first
    return [[torch.cat(conds), extras]]


def empty_conditioning(clip: Any) -> list[list]:
    """CONDITIONING of the empty prompt (the negative prompt of collection runs)."""
    return batch_conditioning([encode_tokens(clip, clip.tokenize(""))])


def token_length(clip: Any, prompt: str) -> int:
    """Number of sections x section length the prompt encodes to (to batch equal lengths)."""
    tokens = clip.tokenize(prompt)
    return max(len(sections) * len(sections[0]) for sections in tokens.values())


def steered_clip(clip: Any, transport: Transport, strength: float) -> Any:
    """A clone of `clip` whose text encoder outputs are transported at `strength`.

    `transport` holds sites relative to the text encoder (`clip_l.transformer…`).

    Raises:
        ModelMismatchError: a module is missing or has other parameter shapes.
    """
    steered = clip.clone()
    model = steered.cond_stage_model
    check_fingerprint(model, transport.module_params, transport.model_class)
    if strength == 0:
        return steered
    for name, entries in group_by_module(transport.sites).items():
        key = f"{name}.forward"
        previous = steered.patcher.object_patches.get(key)
        if previous is None:
            module = steered.patcher.get_model_object(name)
            previous = type(module).forward.__get__(module, type(module))
        sites = [(site, index, transport.maps[site]) for site, index in entries]
        steered.patcher.add_object_patch(key, SteeredForward(previous, sites, strength))
    return steered


class SteeredForward:
    """A module's forward followed by the transport of its output sites."""

    def __init__(
        self, forward: Any, sites: list[tuple[str, int | None, ModuleMap]], strength: float
    ) -> None:
        self.forward = forward
        self.sites = sites
        self.strength = strength
        self._coefficients: dict[tuple[str, torch.device], Coefficients] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.forward(*args, **kwargs)
        for site, index, module_map in self.sites:
            tensor = pick_output(output, index, site)
            check_width(tensor, module_map.units, site)
            key = (site, tensor.device)
            if key not in self._coefficients:
                self._coefficients[key] = module_map.coefficients(self.strength).to(tensor.device)
            output = replace_output(output, index, transported(tensor, self._coefficients[key]))
        return output
