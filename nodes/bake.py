"""Node: Bake AcT (fold exact maps into weights through ComfyUI's weight patches)."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io, ui

from ..act import ActError, Transport, bake_deltas
from .apply import parts_of
from .types import CATEGORY, SEARCH_ALIASES
from .types import Transport as TransportSocket


def add_weight_patches(
    patchable: Any, module: Any, transport: Transport, strength: float, prefix: str
) -> Any:
    """A clone of a MODEL or CLIP with "diff" weight patches that fold the transport into
    `module`'s weights (keys are `prefix` + parameter name)."""
    deltas = bake_deltas(module, transport, strength)
    patched = patchable.clone()
    patches = {f"{prefix}{name}": ("diff", [delta]) for name, delta in deltas.items()}
    accepted = set(patched.add_patches(patches, 1.0, 1.0))
    missing = sorted(set(patches) - accepted)
    if missing:
        raise ActError(f"the model refused weight patches for {missing[:3]}")
    return patched


class BakeAcT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTBake",
            display_name="AcT Bake",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "bake transport", "merge into weights"],
            description=(
                "Folds the transport into the weights (like a LoRA), so steering costs nothing "
                "while sampling. Only exact folds are done: maps fitted with support 'all' on "
                "LayerNorm or Linear outputs (choose layers 'exportable (folds into a LoRA)'); "
                "anything else is refused with the reason; use AcT Apply for it."
            ),
            inputs=[
                TransportSocket.Input(
                    "transport",
                    tooltip="A transport fitted with support 'all' on layers that fold (layers 'exportable (folds into a LoRA)').",
                ),
                io.Model.Input(
                    "model", optional=True, tooltip="Diffusion model to bake the transport into."
                ),
                io.Clip.Input(
                    "clip", optional=True, tooltip="Text encoder to bake the transport into."
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=3.0,
                    step=0.05,
                    tooltip="As in AcT Apply (strength_model, strength_clip).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="The diffusion model with the transport in its weights (a patched copy).",
                ),
                io.Clip.Output(
                    display_name="CLIP",
                    tooltip="The text encoder with the transport in its weights (a patched copy).",
                ),
            ],
        )

    @classmethod
    def execute(cls, transport, strength: float, model=None, clip=None) -> io.NodeOutput:
        diffusion, text = parts_of(transport, model, clip)
        notes = []
        if diffusion is not None:
            model = add_weight_patches(
                model, model.model.diffusion_model, diffusion, strength, "diffusion_model."
            )
            notes.append(f"diffusion model: {len(diffusion.maps)} modules baked")
        if text is not None:
            clip = add_weight_patches(clip, clip.cond_stage_model, text, strength, "")
            notes.append(f"text encoder: {len(text.maps)} modules baked")
        return io.NodeOutput(model, clip, ui=ui.PreviewText("; ".join(notes)))
