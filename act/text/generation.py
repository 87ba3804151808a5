"""Generating text from a causal LM, plain or steered, and measuring perplexity.

Steering is `act.steer` around `model.generate`: the maps apply to every position, prompt
and generated tokens alike. Sampling is seeded once per call, so two calls with the same
options draw the same random numbers: at strength 0 the steered model reproduces the plain
one token for token, and a strength sweep compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ActError
from ..steering import steer
from ..transport import Transport
from .collection import encode


@dataclass(frozen=True)
class Sampling:
    """How to generate.

    Attributes:
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 decodes greedily; above 0 samples at that temperature.
        top_p: nucleus sampling threshold (sampling only).
        repetition_penalty: 1 is none; 1.2 keeps small models from looping.
        seed: seeds torch's generator at the start of every call.
        chat: wrap each prompt in the tokenizer's chat template (a user turn).
        batch_size: prompts per `generate` call.
        min_new_tokens: generate at least this many tokens (e.g. equal lengths for timing).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    chat: bool = False
    batch_size: int = 16
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0,
            "batch_size": self.batch_size >= 1,
            "min_new_tokens": 0 <= self.min_new_tokens <= self.max_new_tokens,
        }
        for name, valid in checks.items():
            if not valid:
                raise ActError(f"invalid {name}: {getattr(self, name)!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.temperature > 0,
        }
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return kwargs


def generate_tokens(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling
) -> list[torch.Tensor]:
    """The new token ids for every prompt (padding and prompt removed), in prompt order.

    **Seeds torch's global generator** with `sampling.seed` before the first batch.
    """
    if isinstance(prompts, str) or not prompts:
        raise ActError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for number, prompt in enumerate(prompts, start=1):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ActError(f"prompt {number} is {prompt!r}: give the text to continue or to answer")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    torch.manual_seed(sampling.seed)
    results: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), sampling.batch_size):
            inputs = encode(
                tokenizer, prompts[start : start + sampling.batch_size], chat=sampling.chat
            )
            inputs.pop("position_ids")  # generate derives them from the mask itself
            inputs = {key: value.to(device) for key, value in inputs.items()}
            output = model.generate(**inputs, **sampling.generate_kwargs(), pad_token_id=pad)
            for row in output[:, inputs["input_ids"].shape[1] :].cpu():
                results.append(_strip_padding(row, pad, tokenizer.eos_token_id))
    return results


def generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], sampling: Sampling
) -> list[str]:
    """Continuations of the prompts (decoded, special tokens removed); steer with `act.steer`."""
    tokens = generate_tokens(model, tokenizer, prompts, sampling)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def sweep(
    model: nn.Module,
    tokenizer: Any,
    transport: Transport,
    prompts: Sequence[str],
    strengths: Sequence[float],
    sampling: Sampling,
) -> dict[float, list[str]]:
    """Continuations at every strength, with one set of hooks (no re-fitting, no re-hooking).

    Returns:
        {strength: continuations in prompt order}; every strength uses the same seed.
    """
    outputs: dict[float, list[str]] = {}
    with steer(model, transport, 0.0) as steering:
        for strength in strengths:
            steering.strength = strength
            outputs[float(strength)] = generate(model, tokenizer, prompts, sampling)
    return outputs


def perplexity(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16
) -> float:
    """exp(mean negative log-likelihood) of every real token after the first, over all texts.

    Steer with `act.steer` around the call to measure the steered model.
    """
    if not texts:
        raise ActError("no texts to measure perplexity on")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            inputs = encode(tokenizer, texts[start : start + batch_size])
            inputs = {key: value.to(device) for key, value in inputs.items()}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
            targets = inputs["input_ids"][:, 1:]
            real = inputs["attention_mask"][:, 1:].bool() & inputs["attention_mask"][:, :-1].bool()
            losses = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, reduction="none"
            )
            total += float(losses[real].sum())
            count += int(real.sum())
    if count == 0:
        raise ActError("the texts have no token to predict (each needs at least two tokens)")
    return math.exp(total / count)


def _strip_padding(row: torch.Tensor, pad: int | None, eos: int | list | None) -> torch.Tensor:
    """Drop what `generate` appends after a row has finished (pad tokens after the end)."""
    stops = {pad} | (set(eos) if isinstance(eos, list) else {eos})
    stops.discard(None)
    ends = [i for i, token in enumerate(row.tolist()) if token in stops]
    return row[: ends[0]] if ends else row
