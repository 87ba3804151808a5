"""Diffusers front end: collect activations from a pipeline and fit a transport in one call.

Collection follows the paper: the denoiser is recorded at its first call (the highest-noise
step; `at_steps` picks others), only the conditional rows of a classifier-free-guidance
batch, spatial mean for (B, C, H, W) outputs and, by default, every token of token outputs
as a sample (`pooling="mean"`: the token mean, as in the paper); text encoders are recorded
on the positive prompt's real tokens (up to the first end-of-text token). Each pipeline call
stops as soon as everything is recorded, so a batch costs one denoiser call (see
`act.diffusers.batches`). Steering lives in `act.diffusers.steering`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..collection import collect
from ..errors import ActError
from ..recording import DEFAULT_MAX_TOKENS
from ..samples import Samples
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
    if causal and len(steps) > 1:
        raise ActError(f"causal collection records one denoising step; got at_steps={steps}")
    components = component_names(pipe, where)
    root = pipeline_root(pipe, components)
    layers = default_layers(root) if layers is None else layers
    sites = select_modules(root, layers, family="diffusers")
    collector = Collector(pipe, components, steps)
    batches = [
        collector.batch(prompts[start : start + batch_size], label, seed + i, pipeline_kwargs)
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
    with _progress_bar(progress) as report, _quiet_progress(pipe), collector.hooks():
        samples = collect(
            root,
            sites,
            batches,
            causal=causal,
            method=method,
            support=support,
            max_live_batches=max_live_batches,
            pooling=pooling,
            max_tokens=max_tokens,
            progress=report,
            info=info,
        )
    samples.model_class = type(pipe).__name__
    if len(steps) > 1 and not samples.pooling.per_token and collector.denoiser in components:
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
        method: "linear" (Linear-AcT), "mean" or "gaussian".
        support: "range" (the paper's choice for negation), "all" (for style) or "qNN".
        **options: `where`, `layers`, `at_steps`, `batch_size`, `seed`, `causal`, `pooling`,
            `max_tokens`, `progress` and the pipeline's own keyword arguments, as in
            `collect_pipeline`.

    Returns:
        A transport whose module names are the pipeline's own, prefixed by component, and
        whose info carries the pipeline's fingerprint.
    """
    samples = collect_pipeline(
        pipe, source_prompts, target_prompts, method=method, support=support, **options
    )
    return samples.fit(method, support)
