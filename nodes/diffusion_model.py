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
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import comfy.patcher_extension
import comfy.sample
import torch
from torch import nn

from ..act import ActError, Transport, steer
from ..act.hooks import check_fingerprint, split_site
from . import masking
from .autograd_copies import AutogradCopies
from .block_weights import block_groups, parse_block_weights, site_weights
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


@dataclass(frozen=True)
class JointTokens:
    """A block list whose blocks run on text and image tokens joined on the token axis."""

    blocks: str
    image_first: bool  # [image; text] rather than [text; image]

    def holds(self, site: str) -> bool:
        return site.startswith(f"{self.blocks}.")


# By diffusion model class: AuraFlow's single layers hold [registers; text; image], Lumina2's
# and Z-Image's main layers [caption; image], HiDream's single stream blocks [image; text].
# FLUX-style models (FLUX.1/2, Chroma, HunyuanImage) put [text; image] in their single blocks
# and say where the image tokens are (`img_slice`).
JOINT_TOKENS = {
    "MMDiT": JointTokens("single_layers", image_first=False),
    "NextDiT": JointTokens("layers", image_first=False),
    "HiDreamImageTransformer2DModel": JointTokens("single_stream_blocks", image_first=True),
}
FLUX_SINGLES = JointTokens("single_blocks", image_first=False)


def joint_tokens(diffusion_model: nn.Module) -> JointTokens | None:
    """Which blocks of a ComfyUI diffusion model join text and image tokens (None: none)."""
    if is_flux(diffusion_model):
        return FLUX_SINGLES
    return JOINT_TOKENS.get(type(diffusion_model).__name__)


def image_token_count(diffusion_model: nn.Module, latent: torch.Tensor) -> int:
    """How many image tokens a DiT makes of `latent` (B, C, H, W) or (B, C, T, H, W): one per
    patch of its `patch_size` (an int for height and width, or one size per axis), the
    latent padded to whole patches as the models do."""
    spatial = latent.shape[2:]
    patch = getattr(diffusion_model, "patch_size", 1)
    sizes = list(patch) if isinstance(patch, list | tuple) else [int(patch)] * 2
    sizes = [1] * (len(spatial) - len(sizes)) + sizes[-len(spatial) :]
    return math.prod(math.ceil(length / size) for length, size in zip(spatial, sizes, strict=True))


class TokenSplit:
    """Where the image tokens of joint text + image blocks are, for one model call.

    The image tokens are the `image_tokens` first or last ones of the joint blocks' outputs
    (see `JOINT_TOKENS`); FLUX-style models also put `img_slice = [first image token, end]`
    (the text tokens, then all tokens) in the options they pass to every single block, which
    a pre-hook reads, so extra text tokens (HunyuanImage's glyph tokens) are never taken for
    image tokens.
    """

    def __init__(self, layout: JointTokens | None, image_tokens: int) -> None:
        self.layout = layout
        if image_tokens <= 0:
            self.image = slice(None)
        elif layout is not None and layout.image_first:
            self.image = slice(0, image_tokens)
        else:
            self.image = slice(-image_tokens, None)

    @classmethod
    def of_call(cls, diffusion_model: nn.Module, arguments: dict[str, Any]) -> TokenSplit:
        """The split of one `apply_model` call, from its latent `x`."""
        layout = joint_tokens(diffusion_model)
        latent = arguments.get("x")
        count = image_token_count(diffusion_model, latent) if layout and latent is not None else 0
        return cls(layout, count)

    def joins(self, site: str) -> bool:
        """Whether `site` outputs joint text + image tokens, of which only the image's count."""
        return self.layout is not None and self.layout.holds(site)

    def rows(self, rows: list[slice]) -> list[tuple[slice, slice]]:
        """Index expressions keeping only the image tokens of `rows`."""
        return [(r, self.image) for r in rows]

    def read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        split = (kwargs.get("transformer_options") or {}).get("img_slice")
        if isinstance(split, list | tuple) and len(split) == 2:
            self.image = slice(int(split[0]), int(split[1]))

    def attach(self, root: nn.Module, sites: list[str], stack: ExitStack) -> None:
        """Pre-hooks reading `img_slice` on the joint blocks among `sites`, removed when
        `stack` closes."""
        if self.layout is not FLUX_SINGLES:
            return
        for name in dict.fromkeys(split_site(site)[0] for site in sites if self.joins(site)):
            handle = root.get_submodule(name).register_forward_pre_hook(self.read, with_kwargs=True)
            stack.callback(handle.remove)


def steered_model(
    model: Any,
    transport: Transport,
    strength: float,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    positive_only: bool = False,
    block_weights: str = "",
    mask: torch.Tensor | None = None,
) -> Any:
    """A clone of `model` whose diffusion model is steered while sampling.

    Args:
        transport: sites relative to the diffusion model (`input_blocks.1.1…`).
        start_percent, end_percent: steer only while the sampling progress is in this range,
            converted to sigmas by the model_sampling in effect when the model runs (so a
            ModelSampling node after this one moves nothing).
        positive_only: steer only the positive (conditional) half of CFG batches.
        block_weights: one factor per block group (`block_weights.block_groups`), "" for 1.
        mask: a ComfyUI MASK; steer only inside it (`masking`).

    Raises:
        ModelMismatchError: a module is missing or has other parameter shapes.
        ActError: block_weights or mask do not fit the model.
    """
    root = model.model.diffusion_model
    check_fingerprint(root, transport.module_params, transport.model_class)
    window = SigmaWindow(start_percent, end_percent)
    parts = steered_parts(transport, root, strength, block_weights)
    region = None if mask is None else masking.as_mask(mask)

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = call_arguments(executor, args, kwargs)
        options = arguments.get("transformer_options") or {}
        sigmas = options.get("sigmas")
        if not parts or (
            sigmas is not None
            and not window.holds(executor.class_obj.model_sampling, float(sigmas.max()))
        ):
            return executor(*args, **kwargs)
        kinds = list(options.get("cond_or_uncond") or [0])
        diffusion = executor.class_obj.diffusion_model
        split = TokenSplit.of_call(diffusion, arguments)
        layout = None
        if region is not None:
            layout = masking.TokenLayout.of_call(
                diffusion, arguments["x"], arguments.get("c_crossattn")
            )
        with ExitStack() as stack:
            split.attach(diffusion, transport.sites, stack)
            steerings = []
            for joint, factor, part in parts:
                rows = _row_selector(kinds, positive_only, joint, split)
                if region is None:
                    steering = steer(diffusion, part, factor, rows=rows)
                else:
                    steering = masking.MaskedSteering(diffusion, part, factor, region, layout, rows)
                steerings.append(stack.enter_context(steering))
            output = executor(*args, **kwargs)
        if not any(steering.calls for steering in steerings):
            raise ActError(
                f"AcT Apply: the {type(diffusion).__name__} ran, but none of the "
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


class SigmaWindow:
    """start/end percent of the schedule as sigmas, converted by the model_sampling in effect
    when the model runs (as ComfyUI's ControlNets do when sampling starts), once per
    model_sampling object."""

    def __init__(self, start_percent: float, end_percent: float) -> None:
        self.start_percent, self.end_percent = start_percent, end_percent
        self._sampling: Any = None
        self._sigmas = (math.inf, 0.0)

    def sigmas(self, model_sampling: Any) -> tuple[float, float]:
        """(sigma where steering starts, sigma where it ends) under `model_sampling`."""
        if model_sampling is not self._sampling:
            self._sigmas = (
                float(model_sampling.percent_to_sigma(self.start_percent)),
                float(model_sampling.percent_to_sigma(self.end_percent)),
            )
            self._sampling = model_sampling
        return self._sigmas

    def holds(self, model_sampling: Any, sigma: float) -> bool:
        """Whether a call at `sigma` is inside the window."""
        start, end = self.sigmas(model_sampling)
        return end <= sigma <= start


def steered_parts(
    transport: Transport, root: nn.Module, strength: float, block_weights: str = ""
) -> list[tuple[bool, float, Transport]]:
    """(joint text + image sites?, strength, sites) parts to steer: sites of joint blocks need
    their text tokens left alone (their own row selector), and each block group its strength
    (strength x the group's weight). Parts at strength 0 are left out."""
    groups = block_groups(root) if (block_weights or "").strip() else []
    weights = site_weights(transport.sites, groups, parse_block_weights(block_weights, groups))
    layout = joint_tokens(root)
    by_part: dict[tuple[bool, float], list[str]] = {}
    for site in transport.sites:
        joint = layout is not None and layout.holds(site)
        by_part.setdefault((joint, strength * weights[site]), []).append(site)
    return [
        (joint, factor, transport.subset(sites))
        for (joint, factor), sites in by_part.items()
        if factor != 0
    ]


def _row_selector(
    kinds: list[int], positive_only: bool, joint: bool, split: TokenSplit
) -> Callable[[int], list] | None:
    if not positive_only and not joint:
        return None

    def rows(batch: int) -> list:
        chosen = positive_rows(kinds, batch) if positive_only else [slice(None)]
        return split.rows(chosen) if joint else chosen

    return rows


class FirstSteps:
    """Sampling context of one collection batch: which calls to record, which rows are positive.

    The wrapper counts the diffusion model's calls; the first `steps` are recorded and
    sampling stops after the last of them.
    """

    class Stop(Exception):
        """Ends sampling once the recorded steps are done."""

    def __init__(
        self, steps: int, sites: list[str] | None = None, copies: AutogradCopies | None = None
    ) -> None:
        self.steps = steps
        self.sites = list(sites or [])
        self.copies = copies
        self.calls = 0
        self.kinds: list[int] = [0]
        self.split = TokenSplit(None, 0)

    @property
    def recording(self) -> bool:
        return 0 < self.calls <= self.steps

    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        arguments = call_arguments(executor, args, kwargs)
        options = arguments.get("transformer_options") or {}
        self.kinds = list(options.get("cond_or_uncond") or [0])
        diffusion = executor.class_obj.diffusion_model
        self.split = TokenSplit.of_call(diffusion, arguments)
        self.calls += 1
        with ExitStack() as stack:
            self.split.attach(diffusion, self.sites, stack)
            if self.copies is not None:  # an end-to-end fit: gradients through this call
                stack.enter_context(self.copies.differentiable(executor.class_obj))
            output = executor(*args, **kwargs)
        if self.calls >= self.steps:
            raise FirstSteps.Stop
        return output

    def select(self, site: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The positive rows (and, at joint text + image sites, image tokens) of a recorded
        call, or None."""
        if not self.recording:
            return None
        rows: list[Any] = positive_rows(self.kinds, tensor.shape[0])
        if self.split.joins(site):
            rows = self.split.rows(rows)
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
        self.calls = 0  # a batch may run again (an end-to-end fit runs it every step)
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
