"""Collection batches on ComfyUI's own loading and sampling path.

The root is a ModuleDict of the parts collected from (`diffusion_model`, `clip`), so sites
read `diffusion_model.input_blocks.1.1…` and `clip.clip_l.transformer…`. Each batch encodes
its prompts with the CLIP (text-encoder sites are pooled over real tokens of the positive
prompts only) and, for the diffusion model, runs ComfyUI's sampler until the first `steps`
denoising calls are done, pooling only their positive rows.

Under either pooling (`act.recording`) the rows given to the recorder are unpooled: a
text-encoder site gets the prompt's tokens with their real-token mask, a UNet transformer
norm its (B, HW, D) image tokens, a channel map its (B, C, H, W) output, and a joint text +
image block only its image tokens. Per-token samples have no padding mask in two places: the
text stream of a DiT's double blocks (e.g. FLUX `double_blocks.N:1`) holds all its text
tokens, padding included; and a text-encoder output that does not line up with the
tokenizer's mask (another length or shape) is pooled without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import comfy.model_management
import comfy.utils
import torch
from torch import nn

from ..act import ActError, Batch, ModulesNeverRanError
from . import diffusion_model, text_encoder
from .autograd_copies import AutogradCopies
from .presets import resolve_layers, suggested_regex

WHERE = ["diffusion model", "text encoder", "both"]


def collection_root(
    model: Any,
    clip: Any,
    where: str,
    layers: str,
    regex: str,
    probe_size: tuple[int, int, int] = (256, 256, 1),
) -> tuple[nn.ModuleDict, list[str]]:
    """The loaded modules to collect from (`collection_parts`), and the sites (prefixed by
    part).

    A DiT's "auto" sites come from a dry run: one denoising call at `probe_size` (width,
    height in pixels, frames) with an empty prompt.
    """
    root = collection_parts(model, clip, where)
    probes = {
        diffusion_model.PREFIX: lambda blocks: token_block_sites(model, clip, blocks, probe_size)
    }
    sites = [
        f"{prefix}.{site}"
        for prefix, part in root.items()
        for site in resolve_layers(part, layers, regex, probes.get(prefix))
    ]
    return root, sites


def collection_parts(model: Any, clip: Any, where: str) -> nn.ModuleDict:
    """The parts that `where` collects from, loaded for use, under their prefixes
    (`diffusion_model`, `clip`)."""
    check_connected(model, clip, where)
    parts: dict[str, nn.Module] = {}
    if where in ("diffusion model", "both"):
        comfy.model_management.load_models_gpu([model])
        parts[diffusion_model.PREFIX] = model.model.diffusion_model
    if where in ("text encoder", "both"):
        comfy.model_management.load_model_gpu(clip.patcher)
        parts[text_encoder.PREFIX] = clip.cond_stage_model
    return nn.ModuleDict(parts)


def check_connected(model: Any, clip: Any, where: str) -> None:
    """Raise unless the parts that `where` collects from (and the CLIP) are connected."""
    if where not in WHERE:
        raise ActError(f"unknown 'where' {where!r}; choose one of {WHERE}")
    if clip is None:
        raise ActError("connect a CLIP: it encodes the prompts (and is steered for 'text encoder')")
    if where in ("diffusion model", "both") and model is None:
        raise ActError(f"where is {where!r}: connect a MODEL")


def token_block_sites(
    model: Any, clip: Any, blocks: list[str], size: tuple[int, int, int]
) -> list[str]:
    """The sites among `blocks` that output (batch, tokens, width) tensors when the model
    runs: `name` for a tensor, `name:i` for each such element of a tuple (streams); blocks
    that do not run are dropped. **Runs** one denoising call of `model` (a dry run)."""
    root = model.model.diffusion_model
    found: dict[str, list[int | None]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                streams: list[int | None] = [None] if _is_tokens(output) else []
            else:
                streams = [i for i, item in enumerate(output) if _is_tokens(item)]
            found.setdefault(name, streams)

        return hook

    handles = [root.get_submodule(name).register_forward_hook(recorder(name)) for name in blocks]
    try:
        conditioning = text_encoder.empty_conditioning(clip)
        latent = collection_latent(model, 1, *size)
        steps = diffusion_model.FirstSteps(1)
        steps.sample(model, conditioning, conditioning, latent, 0, [0])
    finally:
        for handle in handles:
            handle.remove()
    return [
        name if index is None else f"{name}:{index}"
        for name in blocks
        for index in found.get(name, [])
    ]


def _is_tokens(item: Any) -> bool:
    return isinstance(item, torch.Tensor) and item.ndim == 3


def describe_models(model: Any, clip: Any, where: str) -> str:
    """What a transport was fitted on, for error messages: "SD15 UNetModel + SD1ClipModel"."""
    parts = []
    if where in ("diffusion model", "both"):
        config = type(model.model.model_config).__name__
        parts.append(f"{config} {type(model.model.diffusion_model).__name__}")
    if where in ("text encoder", "both"):
        parts.append(type(clip.cond_stage_model).__name__)
    return " + ".join(parts)


def never_ran_error(
    error: ModulesNeverRanError, root: nn.ModuleDict, models: str, layers: str
) -> ActError:
    """The node's error for modules that never ran: the model classes, the layers choice and
    a `custom regex` to try instead."""
    part = error.sites[0].partition(".")[0] if error.sites else diffusion_model.PREFIX
    module = root[part] if part in root else next(iter(root.values()))
    return ActError(
        f"Collect Activations: {len(error.sites)} of the modules that layers {layers!r} chose "
        f"on the {models} never ran (e.g. {error.sites[0]!r}), so they cannot be steered; "
        f"choose 'custom regex' and name modules that run, such as the outputs of its blocks "
        f"(e.g. '{suggested_regex(module)}')"
    )


def collection_batches(
    model: Any,
    clip: Any,
    where: str,
    prompts: dict[str, list[str]],
    *,
    batch_size: int,
    seed: int,
    size: tuple[int, int, int],
    steps: int,
    sites: Sequence[str] = (),
    progress: PromptProgress | None = None,
    copies: AutogradCopies | None = None,
) -> list[Batch]:
    """One `act.Batch` per chunk of prompts of equal token length, sources first.

    `size` is the collection's (width, height) in pixels and its frames (video models).

    `sites` (prefixed by part) tell which joint text + image blocks need their token split,
    and how many outputs each batch records, which `progress` counts.

    With `copies` the batches let autograd through the parts `where` names (for an end-to-end
    fit): each prompt encoding (where the text encoder is steered) and each denoising call run
    with gradients enabled, the part's inference-tensor weights swapped for `copies` and the
    activations autograd saves copied (`AutogradCopies.differentiable`).
    """
    diffusion = where in ("diffusion model", "both")
    text = where in ("text encoder", "both")
    prefix = f"{diffusion_model.PREFIX}."
    denoiser_sites = [site[len(prefix) :] for site in sites if site.startswith(prefix)]
    text_sites = len(sites) - len(denoiser_sites)
    batches = []
    for label, texts in prompts.items():
        first = 0
        for chunk in _chunks(clip, texts, batch_size):
            steps_run = (
                diffusion_model.FirstSteps(steps, denoiser_sites, copies) if diffusion else None
            )
            indices = list(range(first, first + len(chunk)))
            batch = _BatchRun(model, clip, chunk, text, steps_run, seed, size, indices, copies)
            expected = text_sites * len(chunk) + (len(denoiser_sites) * steps if diffusion else 0)
            batch.progress = None if progress is None else progress.batch(len(chunk), expected)
            batches.append(Batch(batch.run, label, select=batch.select))
            first += len(chunk)
    return batches


class PromptProgress:
    """ComfyUI's progress bar for a collection, counted in prompts.

    The bar moves within a batch as its outputs are recorded (one sampler call can take
    minutes on a CPU), and reaches a batch's end when the batch is done; every move checks
    for Cancel, so a cancelled collection stops at the next recorded output.
    """

    def __init__(self, prompts: int) -> None:
        self.total = prompts
        self.done = 0
        self.bar = comfy.utils.ProgressBar(prompts)

    def batch(self, prompts: int, outputs: int) -> _BatchProgress:
        """The progress of one batch of `prompts` prompts that records `outputs` outputs."""
        return _BatchProgress(self, prompts, max(outputs, 1))

    def show(self, value: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(min(value, self.total), self.total)


class _BatchProgress:
    def __init__(self, overall: PromptProgress, prompts: int, outputs: int) -> None:
        self.overall = overall
        self.prompts = prompts
        self.outputs = outputs
        self.recorded = 0

    def output_recorded(self) -> None:
        self.recorded += 1
        share = min(self.recorded / self.outputs, 1.0)
        self.overall.show(self.overall.done + self.prompts * share)

    def finished(self) -> None:
        self.overall.done += self.prompts
        self.overall.show(self.overall.done)


def collection_latent(
    model: Any, batch: int, width: int, height: int, frames: int = 1
) -> torch.Tensor:
    """An empty latent of `width` x `height` pixels in the model's own latent format: its
    channels and spatial downscale (8 for SD/FLUX.1, 16 for FLUX.2 and Wan 2.2 5B, 32 for
    HunyuanImage 2.1), and for video models `frames` frames, in latent frames of the
    model's temporal compression (4 for Wan and HunyuanVideo: 1 + (frames - 1) // 4)."""
    latent_format = model.get_model_object("latent_format")
    ratio = int(getattr(latent_format, "spacial_downscale_ratio", 8))
    dimensions = int(getattr(latent_format, "latent_dimensions", 2))
    if dimensions not in (2, 3):
        raise ActError(
            f"{type(model.model).__name__} makes {dimensions}-D latents (audio?); collection "
            "needs an image or video model"
        )
    shape = [batch, latent_format.latent_channels, max(1, height // ratio), max(1, width // ratio)]
    if dimensions == 2:
        return torch.zeros(shape)
    compression = max(int(getattr(latent_format, "temporal_downscale_ratio", 1)), 1)
    return torch.zeros([*shape[:2], 1 + (max(frames, 1) - 1) // compression, *shape[2:]])


def _chunks(clip: Any, texts: list[str], size: int) -> list[list[str]]:
    """Consecutive chunks of at most `size` prompts that encode to the same length."""
    chunks: list[list[str]] = []
    length = None
    for prompt in texts:
        prompt_length = text_encoder.token_length(clip, prompt)
        if chunks and len(chunks[-1]) < size and prompt_length == length:
            chunks[-1].append(prompt)
        else:
            chunks.append([prompt])
        length = prompt_length
    return chunks


class _BatchRun:
    """Runs one batch and tells the recorder which outputs belong to it."""

    def __init__(
        self,
        model: Any,
        clip: Any,
        prompts: list[str],
        text: bool,
        steps: diffusion_model.FirstSteps | None,
        seed: int,
        size: tuple[int, int, int],
        indices: list[int],
        copies: AutogradCopies | None = None,
    ) -> None:
        self.model = model
        self.clip = clip
        self.prompts = prompts
        self.text = text
        self.steps = steps
        self.seed = seed
        self.size = size
        self.indices = indices
        self.masks: dict[str, torch.Tensor] | None = None
        self.progress: _BatchProgress | None = None
        self.copies = copies

    def run(self) -> None:
        encoded = []
        for prompt in self.prompts:
            tokens = self.clip.tokenize(prompt)
            self.masks = text_encoder.real_token_masks(self.clip, tokens) if self.text else None
            encoded.append(self._encode(tokens))
        self.masks = None
        if self.steps is not None:
            positive = text_encoder.batch_conditioning(encoded)
            negative = text_encoder.empty_conditioning(self.clip)
            latent = collection_latent(self.model, len(self.prompts), *self.size)
            self.steps.sample(self.model, positive, negative, latent, self.seed, self.indices)
        if self.progress is not None:
            self.progress.finished()

    def _encode(self, tokens: dict) -> dict[str, Any]:
        if self.copies is None or not self.text:
            return text_encoder.encode_tokens(self.clip, tokens)
        # loaded (and any weight patches applied) before the copies are swapped in
        self.clip.load_model(tokens)
        with self.copies.differentiable(self.clip.cond_stage_model):
            return text_encoder.encode_tokens(self.clip, tokens)

    def select(self, site: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        chosen = self._rows(site, tensor)
        if chosen is not None and self.progress is not None:
            self.progress.output_recorded()
        return chosen

    def _rows(self, site: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        part, _, name = site.partition(".")
        if part == text_encoder.PREFIX:
            return self._text_rows(name, tensor)
        if self.steps is None:
            return None
        rows = self.steps.select(name, tensor)
        return None if rows is None else (rows, None)

    def _text_rows(self, site: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        if self.masks is None:
            return None
        mask = self.masks.get(text_encoder.token_key(site))
        if mask is None or tensor.ndim != 3 or tensor.shape[0] < mask.shape[0]:
            return tensor[:1], None
        sections = tensor[: mask.shape[0]]
        if sections.shape[1] != mask.shape[1]:
            return sections.reshape(1, -1, tensor.shape[-1]), None
        return sections.reshape(1, -1, tensor.shape[-1]), mask.reshape(1, -1)
