"""Diffusers front end: collect activations from a pipeline and fit a transport in one call.

Collection follows the paper: the denoiser is recorded at its first call (the highest-noise
step; `at_steps` picks others), only the conditional rows of a classifier-free-guidance
batch, spatial mean for (B, C, H, W) outputs and, by default, every token of token outputs
as a sample (`pooling="mean"`: the token mean, as in the paper); text encoders are recorded
on the positive prompt's real tokens (up to the first end-of-text token). Each pipeline call
stops as soon as everything is recorded, so a batch costs one denoiser call (see
`act.diffusers.batches`). `fit_pipeline(method="end-to-end")` trains the maps jointly through
the same calls instead (`act.end_to_end`). Steering lives in `act.diffusers.steering`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..collection import collect
from ..end_to_end import EndToEnd, fit_end_to_end, settings_from_options
from ..errors import ActError
from ..maps import END_TO_END
from ..recording import DEFAULT_MAX_TOKENS
from ..samples import Batch, Samples
from ..selection import select_modules
from ..transport import Transport
from .anatomy import component_names, pipeline_fingerprint, pipeline_root
from .batches import Collector
from .presets import default_layers

RESERVED = (
    "prompt",
    "prompt_2",
    "prompt_embeds",
    "generator",
    "latents",
    "output_type",
    "num_images_per_prompt",
)


def _prompt_list(prompts: Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        raise ActError(f"{name} must be a list of prompts, got the single string {prompts!r}")
    prompts = list(prompts)
    if not prompts:
        raise ActError(f"{name} is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ActError(f"{name}[{i}] is {type(prompt).__name__}, not a string: {prompt!r}")
    return prompts


@contextmanager
def _quiet_progress(pipe: Any) -> Iterator[None]:
    """Hide the pipeline's own progress bar (it would show one bar per batch)."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    previous = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if previous is None:
            del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = previous


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(desc="AcT collection") as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield report


@contextmanager
def _loss_bar(enabled: bool, steps: int) -> Iterator[Callable[[int, int, float], None] | None]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=steps, desc="AcT end-to-end fit", unit="step") as bar:

        def report(step: int, total: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(step - bar.n)

        yield report


@dataclass
class _Plan:
    """What a collection from a pipeline runs: where, on which calls, and what it records."""

    root: nn.Module
    sites: list[str]
    batches: list[Batch]
    collector: Collector
    components: list[str]
    steps: list[int]
    info: dict


def _plan(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    where: str,
    layers: str | Sequence[str] | None,
    at_steps: Sequence[int],
    batch_size: int,
    seed: int,
    pipeline_kwargs: dict[str, Any],
    autograd: bool = False,
) -> _Plan:
    """Check the arguments and lay out the collection's sites and pipeline calls."""
    sources = _prompt_list(source_prompts, "source_prompts")
    targets = _prompt_list(target_prompts, "target_prompts")
    reserved = sorted(set(pipeline_kwargs) & set(RESERVED))
    if reserved:
        raise ActError(f"collection sets {', '.join(reserved)} itself; do not pass it")
    if batch_size < 1:
        raise ActError(f"batch_size must be at least 1, got {batch_size}")
    steps = sorted(set(at_steps))
    if not steps or any(not isinstance(s, int) or s < 0 for s in steps):
        raise ActError(f"at_steps must be non-negative step indices, got {at_steps!r}")
    components = component_names(pipe, where)
    root = pipeline_root(pipe, components)
    layers = default_layers(root) if layers is None else layers
    sites = select_modules(root, layers, family="diffusers")
    collector = Collector(pipe, components, steps)
    batches = [
        collector.batch(
            prompts[start : start + batch_size], label, seed + i, pipeline_kwargs, autograd
        )
        for label, prompts in (("source", sources), ("target", targets))
        for i, start in enumerate(range(0, len(prompts), batch_size))
    ]
    info = {
        "pipeline": pipeline_fingerprint(pipe, components),
        "where": where,
        "layers": layers if layers is None or isinstance(layers, str) else list(layers),
        "at_steps": steps,
        "pipeline_kwargs": {
            k: v for k, v in pipeline_kwargs.items() if isinstance(v, int | float | str | bool)
        },
        "source_prompts": sources,
        "target_prompts": targets,
    }
    return _Plan(root, sites, batches, collector, components, steps, info)


def collect_pipeline(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    where: str = "denoiser",
    layers: str | Sequence[str] | None = None,
    at_steps: Sequence[int] = (0,),
    batch_size: int = 8,
    seed: int = 0,
    causal: bool = False,
    method: str = "linear",
    support: str = "range",
    max_live_batches: int | None = None,
    pooling: str = "tokens",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> Samples:
    """Run the pipeline on source and target prompts and pool the activations (see module doc).

    Args:
        pipe: a diffusers pipeline (SD 1.x/2.x, SDXL, FLUX, their img2img variants, ...).
        source_prompts / target_prompts: what to move away from / towards.
        where: "denoiser" (or its name, "unet" / "transformer"), "text_encoder" (every text
            encoder) or "both".
        layers: presets or full-match regular expressions over the prefixed names
            (`r"unet\\.mid_block\\..*norm\\d"`); None: `unet-norms`, `flux-blocks` and
            `text-encoder-norms` for the components `where` names.
        at_steps: denoising steps to record, counted from the first denoiser call (0: the
            highest noise). They depend on `num_inference_steps`: pass the one you sample with.
            With several steps, each text-encoder sample is repeated once per step.
        batch_size: prompts per pipeline call. Batch i of each side uses seed `seed + i`.
        causal / method / support / max_live_batches: causal estimation, as in
            `act.collect`; one step only.
        pooling / max_tokens: "tokens" (the default: every real token of the positive
            prompt, and up to `max_tokens` image tokens per prompt, is a sample, so a one-word
            attribute keeps its own samples; chosen by measurement on `bench/shapes`, see the
            README) or "mean" (one sample per prompt: token means of the text encoders and
            the denoiser's attention blocks, as in the paper). Channel maps are spatial means
            either way. See `act.collect`.
        progress: show a progress bar.
        **pipeline_kwargs: passed to every pipeline call (height, width, guidance_scale,
            num_inference_steps, negative_prompt, ...); `output_type` is "latent".

    Returns:
        Samples with the pipeline's class and fingerprint, ready for `.fit(method, support)`.
    """
    if method == END_TO_END:
        raise ActError(
            "method 'end-to-end' trains the maps through the pipeline rather than fitting "
            "them from samples; use fit_pipeline(..., method='end-to-end')"
        )
    plan = _plan(
        pipe, source_prompts, target_prompts, where=where, layers=layers, at_steps=at_steps,
        batch_size=batch_size, seed=seed, pipeline_kwargs=pipeline_kwargs,
    )  # fmt: skip
    if causal and len(plan.steps) > 1:
        raise ActError(f"causal collection records one denoising step; got at_steps={plan.steps}")
    collector = plan.collector
    with _progress_bar(progress) as report, _quiet_progress(pipe), collector.hooks():
        samples = collect(
            plan.root,
            plan.sites,
            plan.batches,
            causal=causal,
            method=method,
            support=support,
            max_live_batches=max_live_batches,
            pooling=pooling,
            max_tokens=max_tokens,
            progress=report,
            info=plan.info,
        )
    samples.model_class = type(pipe).__name__
    steps = plan.steps
    if len(steps) > 1 and not samples.pooling.per_token and collector.denoiser in plan.components:
        prefix = f"{collector.denoiser}."
        samples.repeat_each([s for s in samples.sites if not s.startswith(prefix)], len(steps))
    if samples.fitted is not None:
        samples.fitted.model_class = samples.model_class
    return samples


def fit_pipeline(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    *,
    method: str = "linear",
    support: str = "range",
    **options: Any,
) -> Transport:
    """Collect from the pipeline and fit a transport in one call.

        transport = fit_pipeline(pipe, plain_prompts, watercolor_prompts, support="all")
        with steer_pipeline(pipe, transport, strength=1.0):
            image = pipe("a lighthouse at dusk").images[0]

    Args:
        method: "linear" (Linear-AcT), "mean", "gaussian", or "end-to-end" (the maps of every
            site trained jointly through the pipeline, `fit_pipeline_end_to_end`; its settings
            as `end_to_end=EndToEnd(...)` or by name: `steps`, `learning_rate`, `sparsity`,
            `init`, `batches_per_step`, and `fit_seed` for the fit's own seed).
        support: "range" (the paper's choice for negation), "all" (for style) or "qNN".
        **options: `where`, `layers`, `at_steps`, `batch_size`, `seed`, `causal`, `pooling`,
            `max_tokens`, `progress` and the pipeline's own keyword arguments, as in
            `collect_pipeline`.

    Returns:
        A transport whose module names are the pipeline's own, prefixed by component, and
        whose info carries the pipeline's fingerprint.
    """
    given = options.pop("end_to_end", None)
    settings = settings_from_options(method, given, options, seed_name="fit_seed")
    if settings is not None:
        return fit_pipeline_end_to_end(
            pipe, source_prompts, target_prompts, settings, support=support, **options
        )
    samples = collect_pipeline(
        pipe, source_prompts, target_prompts, method=method, support=support, **options
    )
    return samples.fit(method, support)


def fit_pipeline_end_to_end(
    pipe: Any,
    source_prompts: Sequence[str],
    target_prompts: Sequence[str],
    settings: EndToEnd | None = None,
    *,
    where: str = "denoiser",
    layers: str | Sequence[str] | None = None,
    at_steps: Sequence[int] = (0,),
    batch_size: int = 8,
    seed: int = 0,
    support: str = "range",
    pooling: str = "tokens",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool | Callable[[int, int, float], None] = True,
    **pipeline_kwargs: Any,
) -> Transport:
    """Train the maps of the chosen sites jointly through the pipeline (`act.end_to_end`).

    The targets are the target prompts' samples at every site; the source prompts run the
    pipeline up to the recorded steps with every map applied, and the summed per-unit
    Wasserstein distance is lowered by gradient steps on the maps alone (the pipeline's
    weights get no gradient and stay as they are). Each step runs the source batches
    forward and backward through the denoiser call(s) recorded (one by default), so memory
    grows with `batch_size` and image size; `settings.batches_per_step` bounds it.

    The options are `collect_pipeline`'s; `progress` shows a bar of the steps with the loss,
    or is called as `progress(step, steps, loss)` (it may raise to cancel: the pipeline is
    left as it was and nothing is returned).
    """
    plan = _plan(
        pipe, source_prompts, target_prompts, where=where, layers=layers, at_steps=at_steps,
        batch_size=batch_size, seed=seed, pipeline_kwargs=pipeline_kwargs, autograd=True,
    )  # fmt: skip
    settings = settings or EndToEnd()
    bar = _loss_bar(progress is True, settings.steps)
    with bar as report, _quiet_progress(pipe), plan.collector.hooks():
        transport = fit_end_to_end(
            plan.root,
            plan.sites,
            plan.batches,
            settings,
            support=support,
            pooling=pooling,
            max_tokens=max_tokens,
            progress=progress if callable(progress) else report,
            info=plan.info,
        )
    transport.model_class = type(pipe).__name__
    return transport
