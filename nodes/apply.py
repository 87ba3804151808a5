"""Node: AcT Apply (steer the diffusion model and/or the text encoder)."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..act import ActError
from . import diffusion_model, text_encoder
from .block_weights import TOOLTIP as BLOCK_WEIGHTS_TOOLTIP
from .block_weights import block_groups, describe, parse_block_weights
from .types import CATEGORY, SEARCH_ALIASES, Transport

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


def label(transport, strength_model: float | None, strength_clip: float | None, extras: str) -> str:
    """The strengths used and the transport's description, e.g. "strength 0.5 (watercolor
    style, SD1.5)", or "model 1, clip 0.5 (...)" when the two parts differ; `extras` (block
    weights, mask) follow the strengths, and all strengths 0 read "(off)"."""
    used = [value for value in (strength_model, strength_clip) if value is not None]
    if len(set(used)) == 1:
        text = f"strength {used[0]:g}"
    else:
        text = f"model {strength_model:g}, clip {strength_clip:g}"
    description = str(transport.info.get("description") or "").strip()
    if extras:
        text = f"{text}, {extras}"
    if all(value == 0 for value in used):
        return f"{text} (off)"
    return f"{text} ({description})" if description else text


STRENGTH_TOOLTIP = (
    "0 off, 1 full transport, between: partial; above 1 exaggerates (quality drops fast); "
    "below 0 applies the inverse map."
)


class ApplyAcT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTApply",
            display_name="AcT Apply",
            category=CATEGORY,
            search_aliases=[
                *SEARCH_ALIASES,
                "apply transport",
                "steer model",
                "style strength",
                "regional steering",
            ],
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
                    "strength_model",
                    default=1.0,
                    min=-2.0,
                    max=3.0,
                    step=0.05,
                    tooltip=f"Strength on the diffusion model: {STRENGTH_TOOLTIP}",
                ),
                io.Float.Input(
                    "strength_clip",
                    default=1.0,
                    min=-2.0,
                    max=3.0,
                    step=0.05,
                    tooltip=f"Strength on the text encoder (CLIP): {STRENGTH_TOOLTIP}",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    advanced=True,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Steer from this point of the sampling schedule (0 = first step), as the model samples it (ModelSampling nodes after this one are taken into account).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    advanced=True,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Steer until this point of the sampling schedule (1 = last step).",
                ),
                io.Combo.Input(
                    "apply_to",
                    options=APPLY_TO,
                    default=POSITIVE_ONLY,
                    advanced=True,
                    tooltip=(
                        "Which CFG branches of the diffusion model to steer. positive only "
                        "(default): the conditional branch only; with CFG above 1 the guidance "
                        "difference then carries the transport (steering both branches cancels "
                        "most of it). With CFG 1 (FLUX, distilled models) only the positive "
                        "branch runs, so both choices are the same. both branches: steer the "
                        "negative branch too (weaker; the AcT paper sampled without guidance)."
                    ),
                ),
                io.String.Input(
                    "block_weights",
                    default="",
                    optional=True,
                    advanced=True,
                    tooltip=BLOCK_WEIGHTS_TOOLTIP,
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip=(
                        "Steer the diffusion model only inside this mask (regional steering); "
                        "outside it the model is left exactly as it is. Text-token streams are "
                        "then left unsteered; layers whose layout is unknown are refused."
                    ),
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The steered diffusion model (a patched copy)."
                ),
                io.Clip.Output(
                    display_name="CLIP", tooltip="The steered text encoder (a patched copy)."
                ),
                io.String.Output(
                    "label",
                    display_name="label",
                    tooltip="What was applied, e.g. 'strength 0.5 (watercolor style, SD1.5)': connect it to Labelled Grid's more_labels.",
                ),
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
        strength_model: float,
        strength_clip: float,
        start_percent: float,
        end_percent: float,
        apply_to: str,
        model=None,
        clip=None,
        block_weights: str = "",
        mask=None,
    ) -> io.NodeOutput:
        diffusion, text = parts_of(transport, model, clip)
        notes, extras = [], []
        if diffusion is not None:
            model = diffusion_model.steered_model(
                model,
                diffusion,
                strength_model,
                start_percent,
                end_percent,
                apply_to == POSITIVE_ONLY,
                block_weights=block_weights,
                mask=mask,
            )
            notes.append(f"diffusion model: {len(diffusion.maps)} modules")
            if (block_weights or "").strip():
                groups = block_groups(model.model.diffusion_model)
                weights = parse_block_weights(block_weights, groups)
                notes.append(f"block weights: {describe(groups, weights)}")
                extras.append(f"blocks {', '.join(f'{w:g}' for w in weights)}")
            if mask is not None:
                notes.append("inside the mask only")
                extras.append("masked")
        elif (block_weights or "").strip() or mask is not None:
            notes.append("block_weights and mask ignored: they act on the diffusion model only")
        if text is not None:
            clip = text_encoder.steered_clip(clip, text, strength_clip)
            notes.append(f"text encoder: {len(text.maps)} modules")
        text_label = label(
            transport,
            strength_model if diffusion is not None else None,
            strength_clip if text is not None else None,
            ", ".join(extras),
        )
        summary = f"{text_label}; " + ", ".join(notes)
        return io.NodeOutput(model, clip, text_label, ui=ui.PreviewText(summary))
