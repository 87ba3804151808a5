"""Collection batches on ComfyUI's own loading and sampling path.

The root is a ModuleDict of the parts collected from (`diffusion_model`, `clip`), so sites
read `diffusion_model.input_blocks.1.1…` and `clip.clip_l.transformer…`. Each batch encodes
its prompts with the CLIP (text-encoder sites are pooled over real tokens of the positive
prompts only) and, for the diffusion model, runs ComfyUI's sampler until the first `steps`
denoising calls are done, pooling only their positive rows.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management
import torch
from torch import nn

from ..act import ActError, Batch
from . import diffusion_model, text_encoder
from .presets import is_flux, resolve_layers

WHERE = ["diffusion model", "text encoder", "both"]


def collection_root(
    model: Any, clip: Any, where: str, layers: str, regex: str
) -> tuple[nn.ModuleDict, list[str]]:
    """The loaded modules to collect from, and the sites (prefixed by part)."""
    if where not in WHERE:
        raise ActError(f"unknown 'where' {where!r}; choose one of {WHERE}")
    if clip is None:
        raise ActError("connect a CLIP: it encodes the prompts (and is steered for 'text encoder')")
    parts: dict[str, nn.Module] = {}
    if where in ("diffusion model", "both"):
        if model is None:
            raise ActError(f"where is {where!r}: connect a MODEL")
        comfy.model_management.load_models_gpu([model])
        parts[diffusion_model.PREFIX] = model.model.diffusion_model
    if where in ("text encoder", "both"):
        comfy.model_management.load_model_gpu(clip.patcher)
        parts[text_encoder.PREFIX] = clip.cond_stage_model
    sites = [
        f"{prefix}.{site}"
        for prefix, part in parts.items()
        for site in resolve_layers(part, layers, regex)
    ]
    return nn.ModuleDict(parts), sites


def describe_models(model: Any, clip: Any, where: str) -> str:
    """What a transport was fitted on, for error messages: "SD15 UNetModel + SD1ClipModel"."""
    parts = []
    if where in ("diffusion model", "both"):
        config = type(model.model.model_config).__name__
        parts.append(f"{config} {type(model.model.diffusion_model).__name__}")
    if where in ("text encoder", "both"):
        parts.append(type(clip.cond_stage_model).__name__)
    return " + ".join(parts)


def collection_batches(
    model: Any,
    clip: Any,
    where: str,
    prompts: dict[str, list[str]],
    *,
    batch_size: int,
    seed: int,
    width: int,
    height: int,
    steps: int,
) -> list[Batch]:
    """One `act.Batch` per chunk of prompts of equal token length, sources first."""
    diffusion = where in ("diffusion model", "both")
    text = where in ("text encoder", "both")
    flux = diffusion and is_flux(model.model.diffusion_model)
    batches = []
    for label, texts in prompts.items():
        first = 0
        for chunk in _chunks(clip, texts, batch_size):
            steps_run = diffusion_model.FirstSteps(steps) if diffusion else None
            indices = list(range(first, first + len(chunk)))
            batch = _BatchRun(
                model, clip, chunk, text, flux, steps_run, (seed, width, height), indices
            )
            batches.append(Batch(batch.run, label, select=batch.select))
            first += len(chunk)
    return batches


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
        flux: bool,
        steps: diffusion_model.FirstSteps | None,
        sampling: tuple[int, int, int],
        indices: list[int],
    ) -> None:
        self.model = model
        self.clip = clip
        self.prompts = prompts
        self.text = text
        self.flux = flux
        self.steps = steps
        self.seed, self.width, self.height = sampling
        self.indices = indices
        self.masks: dict[str, torch.Tensor] | None = None

    def run(self) -> None:
        encoded = []
        for prompt in self.prompts:
            tokens = self.clip.tokenize(prompt)
            self.masks = text_encoder.real_token_masks(self.clip, tokens) if self.text else None
            encoded.append(text_encoder.encode_tokens(self.clip, tokens))
        self.masks = None
        if self.steps is None:
            return
        positive = text_encoder.batch_conditioning(encoded)
        negative = text_encoder.batch_conditioning(
            [text_encoder.encode_tokens(self.clip, self.clip.tokenize(""))]
        )
        latent = torch.zeros([len(self.prompts), 4, self.height // 8, self.width // 8])
        self.steps.sample(self.model, positive, negative, latent, self.seed, self.indices)

    def select(self, site: str, tensor: torch.Tensor) -> tuple[torch.Tensor, Any] | None:
        part, _, name = site.partition(".")
        if part == text_encoder.PREFIX:
            return self._text_rows(name, tensor)
        if self.steps is None:
            return None
        rows = self.steps.select(name, tensor, self.flux)
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
