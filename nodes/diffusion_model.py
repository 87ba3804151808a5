"""ComfyUI's diffusion model (MODEL patcher): steering through a keyed wrapper, and sampling
the first denoising calls for collection.

Both use the APPLY_MODEL wrapper, which `BaseModel.apply_model` runs for every model family
(the DIFFUSION_MODEL wrapper is skipped by some: SD3, PixArt, HunyuanDiT, Stable Cascade).
The wrapper registers the hooks when the model runs and removes them on exit, resolving
modules through `executor.class_obj.diffusion_model` at run time (so LoRAs and other patches
applied at load time are seen). A steered call in which no steered module ran is an error,
never a silent no-op. The input MODEL is never modified: nodes clone it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import comfy.patcher_extension
import comfy.sample
import torch
from torch import nn

from ..act import ActError, Transport, steer
from ..act.hooks import check_fingerprint, split_site
from .presets import is_flux

PREFIX = "diffusion_model"
WRAPPER_KEY = "act"
COLLECTION_KEY = "act_collect"
SCHEDULE_STEPS = 20


def call_arguments(executor: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """`apply_model`'s call arguments by name: x, t, c_concat, c_crossattn (the text
    tokens), control, transformer_options, and the model's extra conditions."""
    try:
        return inspect.signature(executor.original).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        options = next((a for a in args if isinstance(a, dict) and "cond_or_uncond" in a), {})
        return {**kwargs, "transformer_options": kwargs.get("transformer_options", options)}


def positive_rows(cond_or_uncond: list[int], batch: int) -> list[slice]:
    """Row slices of the positive (conditional) chunks of a batched model call."""
    size = batch // max(len(cond_or_uncond), 1)
    return [slice(i * size, (i + 1) * size) for i, kind in enumerate(cond_or_uncond) if kind == 0]


def is_single_block(site: str) -> bool:
    """FLUX single-stream block sites, whose outputs hold `[text; image]` tokens."""
    return site.startswith("single_blocks.")


def image_token_rows(rows: list[slice], image: slice) -> list[tuple[slice, slice]]:
    """Index expressions keeping only the image tokens (`image`, on the token axis) of `rows`."""
    return [(r, image) for r in rows]


class TokenSplit:
    """Where the image tokens of single-stream blocks are, as the model says it.

    FLUX-style models put `img_slice = [text tokens, image tokens]` in the transformer options
    they pass to every single block: a pre-hook on those blocks reads it, so extra text
    tokens (HunyuanImage's glyph tokens) are never taken for image tokens. Without it, the
    image tokens are those after the text context's tokens.
    """

    def __init__(self, text_tokens: int) -> None:
        self.image = slice(text_tokens, None)

    def read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        split = (kwargs.get("transformer_options") or {}).get("img_slice")
        if isinstance(split, list | tuple) and len(split) == 2:
            self.image = slice(int(split[0]), int(split[0]) + int(split[1]))

    def attach(self, root: nn.Module, sites: list[str], stack: ExitStack) -> None:
        """Pre-hooks on the single blocks among `sites`, removed when `stack` closes."""
        for name in dict.fromkeys(split_site(site)[0] for site in sites if is_single_block(site)):
            handle = root.get_submodule(name).register_forward_pre_hook(self.read, with_kwargs=True)
            stack.callback(handle.remove)


def steered_model(
    model: Any,
    transport: Transport,
    strength: float,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    positive_only: bool = False,
) -> Any:
    """A clone of `model` whose diffusion model is steered while sampling.

    Args:
        transport: sites relative to the diffusion model (`input_blocks.1.1…`).
        start_percent, end_percent: steer only while the sampling progress is in this range.
        positive_only: steer only the positive (conditional) half of CFG batches.

    Raises:
        ModelMismatchError: a module is missing or has other parameter shapes.
    """
    root = model.model.diffusion_model
    check_fingerprint(root, transport.module_params, transport.model_class)
    sampling = model.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(start_percent))
    sigma_end = float(sampling.percent_to_sigma(end_percent))
    flux = is_flux(root)
    parts = _split_single_blocks(transport) if flux else [(False, transport)]

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = call_arguments(executor, args, kwargs)
        options = arguments.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        if strength == 0 or (
            sigmas is not None and not sigma_end <= float(sigmas.max()) <= sigma_start
        ):
            return executor(*args, **kwargs)
        kinds = list(options.get("cond_or_uncond") or [0])
        split = TokenSplit(_text_tokens(arguments))
        diffusion = executor.class_obj.diffusion_model
        with ExitStack() as stack:
            split.attach(diffusion, transport.sites, stack)
            steerings = [
                stack.enter_context(
                    steer(
                        diffusion,
                        part,
                        strength,
                        rows=_row_selector(kinds, positive_only, singles, split),
                    )
                )
                for singles, part in parts
            ]
            output = executor(*args, **kwargs)
        if not any(steering.calls for steering in steerings):
            raise ActError(
                f"Apply AcT: the {type(diffusion).__name__} ran, but none of the "
                f"{len(transport.maps)} modules the transport steers did (e.g. "
                f"{transport.sites[0]!r}), so nothing was steered; fit the transport on this "
                "model with layers whose modules run (a 'custom regex' of block outputs)"
            )
        return output

    steered = model.clone()
    steered.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper
    )
    return steered


def _text_tokens(arguments: dict[str, Any]) -> int:
    """Number of text tokens the model is conditioned on (0 without a text context)."""
    context = arguments.get("c_crossattn")
    return context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else 0


def _row_selector(
    kinds: list[int], positive_only: bool, singles: bool, split: TokenSplit
) -> Callable[[int], list] | None:
    if not positive_only and not singles:
        return None

    def rows(batch: int) -> list:
        chosen = positive_rows(kinds, batch) if positive_only else [slice(None)]
        return image_token_rows(chosen, split.image) if singles else chosen

    return rows


def _split_single_blocks(transport: Transport) -> list[tuple[bool, Transport]]:
    """FLUX: single-block sites need their text tokens left alone; steer them separately."""
    singles = [site for site in transport.sites if is_single_block(site)]
    others = [site for site in transport.sites if not is_single_block(site)]
    return [
        (single, transport.subset(sites))
        for single, sites in ((False, others), (True, singles))
        if sites
    ]


class FirstSteps:
    """Sampling context of one collection batch: which calls to record, which rows are positive.

    The wrapper counts the diffusion model's calls; the first `steps` are recorded and
    sampling stops after the last of them.
    """

    class Stop(Exception):
        """Ends sampling once the recorded steps are done."""

    def __init__(self, steps: int, sites: list[str] | None = None) -> None:
        self.steps = steps
        self.sites = list(sites or [])
        self.calls = 0
        self.kinds: list[int] = [0]
        self.split = TokenSplit(0)

    @property
    def recording(self) -> bool:
        return 0 < self.calls <= self.steps

    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = call_arguments(executor, args, kwargs)
        options = arguments.get("transformer_options") or {}
        self.kinds = list(options.get("cond_or_uncond") or [0])
        self.split = TokenSplit(_text_tokens(arguments))
        self.calls += 1
        with ExitStack() as stack:
            self.split.attach(executor.class_obj.diffusion_model, self.sites, stack)
            output = executor(*args, **kwargs)
        if self.calls >= self.steps:
            raise FirstSteps.Stop
        return output

    def select(self, site: str, tensor: torch.Tensor, flux: bool) -> torch.Tensor | None:
        """The positive rows (and image tokens) of a recorded call, or None."""
        if not self.recording:
            return None
        rows: list[Any] = positive_rows(self.kinds, tensor.shape[0])
        if flux and is_single_block(site):
            rows = image_token_rows(rows, self.split.image)
        return torch.cat([tensor[index] for index in rows])

    def sample(
        self,
        model: Any,
        positive: list,
        negative: list,
        latent: torch.Tensor,
        seed: int,
        indices: list[int],
    ) -> None:
        """Run ComfyUI's sampler (euler, normal schedule, cfg 1) until the steps are recorded.

        `indices` number the prompts of the batch: prompt i gets the i-th noise of the seed
        whatever the batch size, so the samples do not depend on the batching.
        """
        sampled = model.clone()
        sampled.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, COLLECTION_KEY, self.wrapper
        )
        latent = comfy.sample.fix_empty_latent_channels(sampled, latent)
        noise = comfy.sample.prepare_noise(latent, seed, indices)
        with contextlib.suppress(FirstSteps.Stop):
            comfy.sample.sample(
                sampled,
                noise,
                max(SCHEDULE_STEPS, self.steps),
                1.0,
                "euler",
                "normal",
                positive,
                negative,
                latent,
                denoise=1.0,
                disable_pbar=True,
                seed=seed,
            )
