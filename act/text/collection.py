"""Fitting transports from sentences: tokenizing them into batches and collecting pooled
activations of a causal LM.

Sentences are tokenized without a chat template, left-padded into batches, and every hooked
output is pooled with the mean over the real tokens (the attention mask), as in the paper.
The default layers are the family's preset (`llm`, see `act.text.presets`). `fit_text` with
method "end-to-end" trains the maps of all layers jointly through the model instead
(`act.end_to_end`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..collection import collect
from ..end_to_end import EndToEnd, fit_end_to_end, settings_from_options
from ..errors import ActError
from ..maps import END_TO_END
from ..recording import DEFAULT_MAX_TOKENS
from ..samples import Batch, Samples
from ..selection import select_modules
from ..transport import Transport

DEFAULT_MAX_LENGTH = 128
# The end-to-end defaults for causal LMs: sparsity chosen on SmolLM2 detox (the tuning starts,
# 32 + 32 sentences): the strongest setting measured whose perplexity on both neutral texts
# stayed at or below Linear-AcT's from all 64 + 64 sentences (README, "End-to-end fitting").
END_TO_END_DEFAULTS = EndToEnd(sparsity=1.0)


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    chat: bool = False,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize texts into one left-padded batch with `attention_mask` and `position_ids`.

    With `chat`, every text becomes a user turn of the tokenizer's chat template, followed by
    the assistant's prompt. Position ids count real tokens only (`cumsum(mask) - 1`), so a
    padded row computes exactly what it computes alone, also with absolute positions.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ActError("this tokenizer has no chat template; drop the chat option")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in texts
        ]
    batch = tokenizer(
        list(texts),
        return_tensors="pt",
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
        add_special_tokens=not chat,
    )
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": positions}


def sentence_batches(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[Batch]:
    """Labelled `act.Batch`es that run the model on the source and target sentences.

    Each batch carries its attention mask, so pooling averages over real tokens only.
    """
    if batch_size < 1:
        raise ActError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    keep_one_logit = "logits_to_keep" in inspect.signature(model.forward).parameters
    extra = {"use_cache": False, **({"logits_to_keep": 1} if keep_one_logit else {})}
    batches = []
    for label, texts in (("source", source), ("target", target)):
        for start in range(0, len(texts), batch_size):
            inputs = encode(tokenizer, texts[start : start + batch_size], max_length=max_length)
            inputs = {key: value.to(device) for key, value in inputs.items()}
            run = functools.partial(model, **inputs, **extra)
            batches.append(Batch(run, label, inputs["attention_mask"]))
    return batches


def collect_text(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    *,
    layers: str | Sequence[str] = "llm",
    causal: bool = False,
    method: str = "linear",
    support: str = "range",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    pooling: str = "mean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool | Callable[[int, int], None] = True,
    info: dict | None = None,
) -> Samples:
    """Pooled samples of the source and target sentences at the selected layers.

    Args:
        model: a causal LM (e.g. `LlamaForCausalLM`); site names are its own
            (`model.layers.3.self_attn.o_proj`).
        tokenizer: its tokenizer, padding on the left (see `act.text.models.load_causal_lm`).
        source / target: sentences to move away from / towards (at least 2 each).
        layers: a preset (`llm` picks the family's), or regular expressions.
        causal: estimate module after module on the previous maps' outputs (paper §3.2);
            `method` and `support` are then used while collecting.
        batch_size / max_length: sentences per forward pass, tokens kept per sentence.
        pooling / max_tokens: "mean" (one sample per sentence, the mean of its tokens) or
            "tokens" (every token a sample, at most `max_tokens` per sentence and layer); see
            `act.collect`.
        progress: show a progress bar (batches, or modules fitted when causal), or a
            function called as `progress(done, total)` instead (it may raise to cancel).
        info: free-form fields stored in the transport fitted from the samples.
    """
    if method == END_TO_END:
        raise ActError(
            "method 'end-to-end' trains the maps through the model rather than fitting them "
            "from samples; use fit_text(..., method='end-to-end')"
        )
    sites, batches, info = _sites_and_batches(
        model, tokenizer, source, target, layers, batch_size, max_length, info
    )
    options = {
        "causal": causal,
        "method": method,
        "support": support,
        "pooling": pooling,
        "max_tokens": max_tokens,
        "info": info,
    }
    if callable(progress):
        return collect(model, sites, batches, progress=progress, **options)
    with tqdm(
        total=len(sites) if causal else len(batches),
        desc="fitting modules causally" if causal else "collecting activations",
        unit="module" if causal else "batch",
        disable=not progress,
        leave=False,
    ) as bar:
        return collect(
            model, sites, batches, progress=lambda done, total: bar.update(done - bar.n), **options
        )


def _sites_and_batches(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    layers: str | Sequence[str],
    batch_size: int,
    max_length: int,
    info: dict | None,
) -> tuple[list[str], list[Batch], dict]:
    """The selected sites, the sentences' batches (at least 2 sentences a side), and the
    transport's info: the sentence counts and `info`."""
    for side, texts in (("source", source), ("target", target)):
        if len(texts) < 2:
            raise ActError(
                f"{side} needs at least 2 sentences to fit a transport, got {len(texts)}"
            )
    sites = select_modules(model, layers, family="text")
    batches = sentence_batches(
        model, tokenizer, source, target, batch_size=batch_size, max_length=max_length
    )
    counts = {"source_sentences": len(source), "target_sentences": len(target)}
    return sites, batches, {**counts, **(info or {})}


def fit_text(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    *,
    method: str = "linear",
    support: str = "range",
    end_to_end: EndToEnd | None = None,
    **options: Any,
) -> Transport:
    """Collect samples (see `collect_text`, which takes the other options) and fit them.

    With method "end-to-end" the maps are trained jointly through the model instead (see
    `fit_text_end_to_end`, which takes `end_to_end` or the settings' names as options:
    `steps`, `learning_rate`, `sparsity`, `seed`, `init`, `batches_per_step`; those not given
    are `END_TO_END_DEFAULTS`', sparsity 1).

    Returns:
        A transport carrying the model's fingerprint, to use with `act.steer(model, ...)`.
    """
    settings = settings_from_options(
        method, end_to_end, options, parts="layer", defaults=END_TO_END_DEFAULTS
    )
    if settings is not None:
        return fit_text_end_to_end(
            model, tokenizer, source, target, settings, support=support, **options
        )
    samples = collect_text(
        model, tokenizer, source, target, method=method, support=support, **options
    )
    return samples.fit(method, support)


def fit_text_end_to_end(
    model: nn.Module,
    tokenizer: Any,
    source: Sequence[str],
    target: Sequence[str],
    settings: EndToEnd | None = None,
    *,
    layers: str | Sequence[str] = "llm",
    support: str = "range",
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    pooling: str = "mean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool | Callable[[int, int, float], None] = True,
    info: dict | None = None,
) -> Transport:
    """Train the maps of the selected layers jointly, end to end (`act.end_to_end`).

    The options are `collect_text`'s; `progress` shows a bar of the steps with the loss, or is
    called as `progress(step, steps, loss)` (it may raise to cancel: the model is left as it
    was and nothing is returned).
    """
    sites, batches, info = _sites_and_batches(
        model, tokenizer, source, target, layers, batch_size, max_length, info
    )
    options = {
        "support": support,
        "pooling": pooling,
        "max_tokens": max_tokens,
        "info": info,
    }
    settings = settings or END_TO_END_DEFAULTS
    if callable(progress):
        return fit_end_to_end(model, sites, batches, settings, progress=progress, **options)
    with tqdm(
        total=settings.steps, desc="fitting end to end", unit="step", disable=not progress,
        leave=False,
    ) as bar:  # fmt: skip

        def show(step: int, steps: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(step - bar.n)

        return fit_end_to_end(model, sites, batches, settings, progress=show, **options)
