"""Node: Apply AcT (steer the diffusion model and/or the text encoder)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..act import ActError
from . import diffusion_model, text_encoder
from .types import CATEGORY, Transport

POSITIVE_ONLY = "positive only"
APPLY_TO = [POSITIVE_ONLY, "both branches"]


def parts_of(transport, model, clip) -> tuple:
    """(diffusion-model part, text-encoder part) of a transport, checked against the inputs."""
    diffusion = transport.component(diffusion_model.PREFIX)
    text = transport.component(text_encoder.PREFIX)
    if diffusion is None and text is None:
        raise ActError(
            "this transport names no ComfyUI module (sites start with neither "
            f"'diffusion_model.' nor 'clip.'): {transport.sites[:3]}; it was fitted elsewhere"
        )
    if diffusion is not None and model is None and (text is None or clip is None):
        raise ActError("this transport steers the diffusion model: connect a MODEL")
    if text is not None and clip is None and (diffusion is None or model is None):
        raise ActError("this transport steers the text encoder: connect a CLIP")
    return (diffusion if model is not None else None), (text if clip is not None else None)


class ApplyAcT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTApply",
            display_name="Apply AcT",
            category=CATEGORY,
            description=(
                "Steers the model with a transport while it runs: strength 0 is off, 1 moves the "
                "activations fully to the target, negative values go the other way. Returns "
                "patched copies; the inputs are left untouched."
            ),
            inputs=[
                Transport.Input("transport", tooltip="From Fit Transport or Load Transport."),
                io.Model.Input("model", optional=True, tooltip="Diffusion model to steer."),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="Text encoder to steer. Connect the steered CLIP to the positive prompt's CLIP Text Encode only; the negative prompt keeps the unsteered CLIP.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=3.0,
                    step=0.05,
                    tooltip="0 off, 1 full transport, between: partial; above 1 exaggerates (quality drops fast); below 0 applies the inverse map.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Steer from this point of the sampling schedule (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Steer until this point of the sampling schedule (1 = last step).",
                ),
                io.Combo.Input(
                    "apply_to",
                    options=APPLY_TO,
                    default=POSITIVE_ONLY,
                    tooltip=(
                        "Which CFG branches of the diffusion model to steer. positive only "
                        "(default): the conditional branch only; with CFG above 1 the guidance "
                        "difference then carries the transport (steering both branches cancels "
                        "most of it). With CFG 1 (FLUX, distilled models) only the positive "
                        "branch runs, so both choices are the same. both branches: steer the "
                        "negative branch too (weaker; the AcT paper sampled without guidance)."
                    ),
                ),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_percent: float, end_percent: float) -> bool | str:
        if start_percent > end_percent:
            return f"start_percent ({start_percent}) is after end_percent ({end_percent})"
        return True

    @classmethod
    def execute(
        cls,
        transport,
        strength: float,
        start_percent: float,
        end_percent: float,
        apply_to: str,
        model=None,
        clip=None,
    ) -> io.NodeOutput:
        diffusion, text = parts_of(transport, model, clip)
        notes = []
        if diffusion is not None:
            model = diffusion_model.steered_model(
                model, diffusion, strength, start_percent, end_percent, apply_to == POSITIVE_ONLY
            )
            notes.append(f"diffusion model: {len(diffusion.maps)} modules")
        if text is not None:
            clip = text_encoder.steered_clip(clip, text, strength)
            notes.append(f"text encoder: {len(text.maps)} modules")
        summary = f"strength {strength:g}; " + ", ".join(notes)
        return io.NodeOutput(model, clip, ui=ui.PreviewText(summary))
