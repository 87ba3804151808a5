"""Collecting pooled samples from a model, simultaneously or causally."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .causal import _CausalFitter, collect_lockstep, collect_truncated
from .errors import ActError
from .hooks import module_fingerprint
from .maps import END_TO_END, METHODS, Support
from .recording import DEFAULT_MAX_TOKENS, Pooling, Recorder
from .samples import Batch, Samples
from .transport import Transport


def collect(
    model: nn.Module,
    sites: Sequence[str],
    batches: Sequence[Batch],
    *,
    causal: bool = False,
    method: str = "linear",
    support: str = "range",
    max_live_batches: int | None = None,
    pooling: str = "mean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    info: dict | None = None,
) -> Samples:
    """Run the batches through the model and pool the outputs of `sites`.

    Args:
        model: the module whose submodules `sites` names (from `select_modules`).
        sites: where to record.
        batches: forward passes labelled "source" or "target".
        causal: fit module after module, each on the outputs of the previous maps (see
            `act.causal`); `method` and `support` are then used while collecting, and the
            returned samples must be fitted with the same ones.
        max_live_batches: causal only: the most batches whose activations may be alive at
            once. With more batches than this, the memory-light truncated schedule runs
            (about (K + 1) / 2 forward passes per sample instead of one).
        pooling: "mean" (one sample per prompt: the mean of its real tokens, the paper's) or
            "tokens" (every real token of a token output a sample, at most `max_tokens` per
            prompt and module; see `act.recording`). Channel maps are spatial means either way.
        max_tokens: per-token pooling only: the most tokens kept per prompt and module
            (memory: at most 4 * max_tokens * units bytes per prompt and module).
        progress: called as `progress(done, total)`: batches done, or with `causal`, modules
            fitted. It may raise to cancel; hooks are removed either way.
        info: free-form fields stored with the samples and the transports fitted from them.

    Returns:
        Samples whose sites are in the order the modules ran (causal) or as given.
    """
    if not batches:
        raise ActError("no batches to collect from: give at least one source and one target batch")
    labels = {batch.label for batch in batches}
    if labels != {"source", "target"}:
        raise ActError(f"collection needs source and target batches; got only {sorted(labels)}")
    if not sites:
        raise ActError("no modules selected: the list of sites is empty")
    if method == END_TO_END:
        raise ActError(
            "method 'end-to-end' trains the maps through the model rather than fitting them "
            "from samples; use act.fit_end_to_end(model, sites, batches, ...)"
        )
    rule = Pooling(pooling, max_tokens)
    info = dict(info or {})
    info["pooling"] = rule.kind
    if rule.per_token:
        info["max_tokens"] = rule.max_tokens
    samples = Samples(
        {}, {}, type(model).__name__, module_fingerprint(model, sites), info=info, pooling=rule
    )
    if causal:
        if method not in METHODS:
            raise ActError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        Support.parse(support)
        fitter = _CausalFitter(model, sites, batches, method, support, rule)
        if max_live_batches is None or len(batches) <= max_live_batches:
            collect_lockstep(fitter, progress)
        else:
            collect_truncated(fitter, progress)
        fitter.check_complete()
        samples.source, samples.target = fitter.sample_tensors()
        samples.module_params = {site: samples.module_params[site] for site in samples.source}
        samples.causal = (method, support)
        samples.fitted = Transport(
            {site: fitter.maps[site] for site in samples.source},
            method,
            support,
            min(len(values) for values in samples.source.values()),
            min(len(values) for values in samples.target.values()),
            model_class=samples.model_class,
            module_params=samples.module_params,
            causal=True,
            info=dict(samples.info),
        )
        return samples
    collected: dict[str, list[dict[str, torch.Tensor]]] = {"source": [], "target": []}
    with Recorder(model, sites, rule) as recorder, torch.inference_mode():
        for done, batch in enumerate(batches, start=1):
            recorder.attention_mask = batch.attention_mask
            recorder.rows = batch.rows
            recorder.select = batch.select
            batch.run()
            collected[batch.label].append(recorder.take())
            if progress is not None:
                progress(done, len(batches))
    samples.source, samples.target = (
        {site: torch.cat([part[site] for part in collected[label]]) for site in sites}
        for label in ("source", "target")
    )
    return samples
