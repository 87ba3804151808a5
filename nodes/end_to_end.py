"""End-to-end fitting in ComfyUI: the maps trained through the loaded models
(`act.fit_end_to_end`), from samples that carry what collected them.

Collect Activations returns `AttachedSamples`: its samples plus a `Replay` of its inputs
(MODEL, CLIP, prompts, settings), so that Fit Transport can run the same batches again with
gradients. Three things of ComfyUI's stand in the way of autograd, and are worked around for
the length of the fit only (`AutogradCopies.differentiable`, nodes/autograd_copies.py):

- nodes run under `torch.inference_mode()`, and checkpoints are loaded there, so weights
  are inference tensors, which autograd refuses to save for the backward pass. While a
  sampler call or a prompt encoding runs, a plain copy of every such weight is put in its
  module; the copies are made once per fit and dropped after it, so **the fit holds a second
  copy of the weights of the parts it steers** (diffusion model, text encoder or both);
- its blocks add to activations in place (`x += ...` in CLIP, `img += ...` in FLUX), so
  autograd saves a copy of each differentiable activation it keeps for the backward pass;
- ComfyUI's samplers run under `torch.no_grad()`, so each denoising call re-enables
  gradients inside the sampler. Gradients flow through each call, not from one denoising
  step to the next, nor from the diffusion model back into the text encoder's maps (with
  where "both", the text encoder's maps are trained on its own layers' losses, and the
  diffusion model's maps on theirs, with the text encoder's maps applied).

ComfyUI's own switch for training, `comfy.model_management.in_training` (set by its LoRA
trainer), is on for the fit: models then take their differentiable code paths (FLUX's rope
in plain torch instead of comfy_kitchen's operator, which has no backward).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.utils
import comfy_execution.utils
import torch

from ..act import ActError, EndToEnd, Samples, Transport, fit_end_to_end
from ..act.recording import DEFAULT_MAX_TOKENS
from .autograd_copies import MODIFIED_IN_PLACE, AutogradCopies
from .collection import collection_batches, collection_parts, describe_models

# autograd's messages for what ComfyUI's models do that cannot be differentiated
NO_GRADIENT = {
    MODIFIED_IN_PLACE: "with a module that changes activations in place",
    "no autograd formula": "with an operation that has no gradient",
}


@dataclass(frozen=True)
class Replay:
    """The inputs of a collection, to run its batches again."""

    model: Any
    clip: Any
    where: str
    prompts: dict[str, list[str]]
    seed: int
    size: tuple[int, int, int]
    steps: int
    batch_size: int
    pooling: str
    causal: bool


@dataclass
class AttachedSamples(Samples):
    """Collected samples with the `Replay` of the collection that made them."""

    replay: Replay | None = None

    @classmethod
    def of(cls, samples: Samples, replay: Replay) -> AttachedSamples:
        """`samples` with `replay` attached."""
        fields = {field.name: getattr(samples, field.name) for field in dataclasses.fields(samples)}
        return cls(**{**fields, "replay": replay})


def show_text(text: str) -> None:
    """Show `text` under the node that is running (ComfyUI's progress text); nothing happens
    outside a running server."""
    context = comfy_execution.utils.get_executing_context()
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if context is not None and instance is not None:
        instance.send_progress_text(text, context.node_id)


def fit_attached(
    samples: Samples, settings: EndToEnd, support: str, description: str = ""
) -> Transport:
    """Train the maps of the samples' sites end to end through the models that collected
    them (the sites Collect chose, not chosen again), with ComfyUI's progress bar over the
    steps and the loss shown under the node (Cancel stops the fit; nothing is returned then
    and the models are left as they were).

    Raises:
        ActError: the samples carry no models (not from Collect Activations) or were
            collected causally, or the model runs an operation autograd cannot differentiate
            (named); bad settings (see `act.EndToEnd`).
    """
    replay = getattr(samples, "replay", None)
    if replay is None:
        raise ActError(
            "method 'end-to-end' trains the maps through the model, so it needs samples "
            "straight from AcT Collect Activations (with its MODEL and CLIP connected)"
        )
    if replay.causal:
        raise ActError(
            "method 'end-to-end' trains every layer jointly; turn Collect's 'causal' off "
            "(causal estimation is for the methods fitted from samples)"
        )
    bar = comfy.utils.ProgressBar(settings.steps)

    def progress(step: int, steps: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(step, steps)
        show_text(f"step {step}/{steps}: loss {loss:.4g}")

    models = describe_models(replay.model, replay.clip, replay.where)
    copies = AutogradCopies()
    training = comfy.model_management.in_training
    try:
        comfy.model_management.in_training = True  # ComfyUI's differentiable code paths
        with torch.inference_mode(False):
            root = collection_parts(replay.model, replay.clip, replay.where)
            sites = samples.sites
            batches = collection_batches(
                replay.model,
                replay.clip,
                replay.where,
                replay.prompts,
                batch_size=replay.batch_size,
                seed=replay.seed,
                size=replay.size,
                steps=replay.steps,
                sites=sites,
                copies=copies,
            )
            info = {**samples.info, **({"description": description} if description else {})}
            transport = fit_end_to_end(
                root,
                sites,
                batches,
                settings,
                support=support,
                pooling=replay.pooling,
                max_tokens=DEFAULT_MAX_TOKENS,
                progress=progress,
                info=info,
            )
    except RuntimeError as error:
        reason = next((why for known, why in NO_GRADIENT.items() if known in str(error)), None)
        if reason is None:
            raise
        raise ActError(
            f"{models}: ComfyUI runs this model {reason}, which autograd cannot differentiate, "
            "so method 'end-to-end' cannot train through it; fit with method 'linear'"
        ) from None
    finally:
        comfy.model_management.in_training = training
        copies.clear()
    return dataclasses.replace(transport, model_class=models)
