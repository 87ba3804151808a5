"""Node: AcT Export LoRA (a transport as a LoRA file that ComfyUI's own LoRA loaders apply)."""

from __future__ import annotations

import os
import re
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

from ..act import ActError, Transport
from ..act.export import (
    LoraExport,
    LoraWeights,
    check_target,
    lora_weights,
    save_lora,
    transport_info,
)
from ..act.hooks import check_fingerprint
from . import diffusion_model, text_encoder
from .types import CATEGORY, SEARCH_ALIASES
from .types import Transport as TransportSocket

LORA_FOLDER = "loras"
# ComfyUI's LoRA loaders map `<key>.diff` / `.diff_b` of these keys to `<key>.weight` / `.bias`
DIFFUSION_KEYS = "diffusion_model."
TEXT_KEYS = "text_encoders."
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def lora_path(name: str) -> str:
    """`models/loras/<name>.safetensors` (the first loras folder), with a safe file name."""
    stem = _UNSAFE.sub("_", name.strip()).strip(". ").removesuffix(".safetensors")
    if not stem:
        raise ActError(f"invalid file name {name!r}: use letters, digits, '-', '_' or '.'")
    return os.path.join(folder_paths.get_folder_paths(LORA_FOLDER)[0], f"{stem}.safetensors")


def comfy_lora_weights(transport: Transport, model: Any, clip: Any) -> LoraWeights:
    """The LoRA tensors of a transport fitted in ComfyUI, keyed as ComfyUI's loaders read
    them; the sites of a part whose MODEL or CLIP is not connected are left out."""
    weights = LoraWeights()
    parts = (
        (diffusion_model.PREFIX, DIFFUSION_KEYS, "MODEL", model and model.model.diffusion_model),
        (text_encoder.PREFIX, TEXT_KEYS, "CLIP", clip and clip.cond_stage_model),
    )
    for prefix, keys, socket, module in parts:
        part = transport.component(prefix)
        if part is None:
            continue
        if module is None:
            reason = f"connect the {socket} the transport was fitted on to export this part"
            missing = {
                f"{prefix}.{site}": f"module '{prefix}.{site}': {reason}" for site in part.sites
            }
            weights = weights.merged(LoraWeights(left_out=missing))
            continue
        check_fingerprint(module, part.module_params, part.model_class)
        part, joint = _without_joint_tokens(part, module) if socket == "MODEL" else (part, {})
        weights = weights.merged(LoraWeights(left_out=joint))
        if part is not None:
            weights = weights.merged(
                lora_weights(module, part, 1.0, key_prefix=keys, site_prefix=f"{prefix}.")
            )
    if not weights.folded and not weights.left_out:
        raise ActError(
            "this transport names no ComfyUI module (sites start with neither "
            f"'diffusion_model.' nor 'clip.'): {transport.sites[:3]}; it was fitted elsewhere"
        )
    return weights


def _without_joint_tokens(part: Transport, root: Any) -> tuple[Transport | None, dict[str, str]]:
    """The part without sites in blocks that join text and image tokens (FLUX's single
    blocks...): AcT Apply steers only their image tokens, which no weight can do."""
    layout = diffusion_model.joint_tokens(root)
    joint = [site for site in part.sites if layout is not None and layout.holds(site)]
    reasons = {
        f"{diffusion_model.PREFIX}.{site}": (
            f"module '{diffusion_model.PREFIX}.{site}' runs on text and image tokens joined, "
            "of which AcT Apply steers the image tokens only: weights would change both"
        )
        for site in joint
    }
    kept = [site for site in part.sites if site not in joint]
    return (part.subset(kept) if kept else None), reasons


class ExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTExportLoRA",
            display_name="AcT Export LoRA",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "export lora", "save lora", "transport to lora"],
            description=(
                "Writes the transport as a LoRA file in models/loras that ComfyUI's own Load "
                "LoRA nodes apply, without this pack: the LoRA's strength is the AcT strength "
                "(on both CFG branches). Only exact folds are written: maps fitted with support "
                "'all' on layer norms or Linear outputs, and Mean-AcT on channel norms; "
                "anything else is refused with the reason, or left out if you allow it."
            ),
            inputs=[
                TransportSocket.Input(
                    "transport",
                    tooltip="A transport fitted with support 'all' on layers that fold (layers 'exportable (folds into a LoRA)'), or Mean-AcT on norm layers.",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The diffusion model the transport was fitted on (needed for its diffusion-model part).",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="The text encoder the transport was fitted on (needed for its text-encoder part).",
                ),
                io.String.Input(
                    "filename",
                    default="act_style",
                    tooltip="File name under models/loras (.safetensors is added).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of that name; off: an existing file stops the node.",
                ),
                io.Boolean.Input(
                    "allow_partial",
                    default=False,
                    tooltip="Write the modules that fold exactly and leave out the others (listed in the node's text); off: any module that cannot fold stops the node.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, transport, filename: str, overwrite: bool, allow_partial: bool, model=None, clip=None
    ) -> io.NodeOutput:
        path = str(check_target(lora_path(filename), overwrite, ".safetensors"))
        written: LoraExport = save_lora(
            comfy_lora_weights(transport, model, clip),
            path,
            overwrite=overwrite,
            allow_partial=allow_partial,
            info=transport_info(transport),
        )
        return io.NodeOutput(ui=ui.PreviewText(written.summary()))
