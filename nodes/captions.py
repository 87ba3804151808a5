"""Node: Style Prompts, paired source and target prompts for Collect Activations."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..act import ActError
from ..act.diffusers import captions as library
from .types import CATEGORY, SEARCH_ALIASES, shown_when

CUSTOM = "custom"
SHOWN_PAIRS = 3


class StylePrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTStylePrompts",
            display_name="AcT Style Prompts",
            category=CATEGORY,
            search_aliases=[
                *SEARCH_ALIASES,
                "style prompts",
                "prompts",
                "captions",
                "caption set",
                "prompt pairs",
                "source target prompts",
            ],
            description=(
                "Makes the two prompt lists of Collect Activations from one list of captions: "
                "the source prompts are the captions as they are, the target prompts the same "
                "captions with a style added (', watercolor painting') and/or a concept "
                "removed ('with a pink elephant'), line for line. Connect the outputs to "
                "Collect Activations' source_prompts and target_prompts."
            ),
            inputs=[
                io.Combo.Input(
                    "caption_set",
                    options=[*library.NAMES, CUSTOM],
                    default=library.MIXED,
                    tooltip=(
                        "Built-in image captions (40 each, plain descriptions without any "
                        "style): mixed (8 of each set), people, animals, places, objects, "
                        "times_of_day (and weather); or custom: the captions typed below."
                    ),
                ),
                io.String.Input(
                    "custom_captions",
                    multiline=True,
                    default="",
                    extra_dict=shown_when("caption_set", CUSTOM),
                    tooltip=(
                        "With caption set 'custom': one caption per line (blank lines and "
                        "lines starting with # are skipped). To remove a concept, every "
                        "caption shows it, e.g. 'a town square, with a pink elephant'."
                    ),
                ),
                io.String.Input(
                    "add",
                    default=", watercolor painting",
                    tooltip=(
                        "What the target prompts add to every caption: the style, e.g. ', "
                        "watercolor painting' or 'pencil sketch' (a comma is put before it "
                        "when it does not start with one). Empty: add nothing."
                    ),
                ),
                io.Combo.Input(
                    "placement",
                    options=list(library.PLACEMENTS),
                    default=library.PLACEMENTS[0],
                    tooltip=(
                        "suffix: after the caption ('a cat on a sofa, watercolor painting'); "
                        "prefix: before it, joined by a space ('a watercolor painting of' + "
                        "'a cat on a sofa')."
                    ),
                ),
                io.String.Input(
                    "remove",
                    default="",
                    tooltip=(
                        "What the target prompts take out of every caption (any case), to "
                        "remove a concept, e.g. 'with a pink elephant' (then use support "
                        "'range' in Fit Transport). Every caption must contain it. Empty: "
                        "remove nothing."
                    ),
                ),
            ],
            outputs=[
                io.String.Output(
                    "source_prompts",
                    display_name="source prompts (plain)",
                    tooltip=(
                        "The captions as they are, one per line: what AcT moves away from. "
                        "Connect to Collect Activations' source_prompts."
                    ),
                ),
                io.String.Output(
                    "target_prompts",
                    display_name="target prompts (styled)",
                    tooltip=(
                        "The same captions with the addition and without the removed words, "
                        "line for line: what AcT moves towards. Connect to Collect "
                        "Activations' target_prompts."
                    ),
                ),
            ],
        )

    @classmethod
    def execute(
        cls, caption_set: str, custom_captions: str, add: str, placement: str, remove: str
    ) -> io.NodeOutput:
        if caption_set == CUSTOM:
            captions = custom_captions.splitlines()
        elif custom_captions.strip():
            raise ActError(
                f"custom_captions has text but caption_set is {caption_set!r}: choose 'custom' "
                "to use your captions, or clear custom_captions"
            )
        else:
            captions = library.caption_set(caption_set)
        sources, targets = library.paired_captions(
            captions, add=add, remove=remove, placement=placement
        )
        shown = "\n".join(
            f"source: {source}\ntarget: {target}"
            for source, target in zip(sources[:SHOWN_PAIRS], targets, strict=False)
        )
        summary = f"{len(sources)} pairs, e.g.\n{shown}"
        return io.NodeOutput("\n".join(sources), "\n".join(targets), ui=ui.PreviewText(summary))
