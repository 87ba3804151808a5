"""Node: Fit Transport."""

from __future__ import annotations

import time
from dataclasses import replace

from comfy_api.latest import io, ui

from ..act import EndToEnd
from ..act.maps import END_TO_END, TRANSPORT_METHODS
from .collect import SUPPORTS
from .end_to_end import fit_attached
from .types import CATEGORY, SEARCH_ALIASES, Samples, Transport, shown_when

DEFAULTS = EndToEnd()


class FitTransport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTFitTransport",
            display_name="AcT Fit Transport",
            category=CATEGORY,
            search_aliases=[
                *SEARCH_ALIASES,
                "fit transport",
                "optimal transport",
                "linear act",
                "end-to-end",
                "lineas",
            ],
            description=(
                "Fits, for every unit of the collected layers, the optimal-transport map from "
                "the source activations to the target ones (Linear-AcT), or trains all the "
                "maps jointly through the model (end-to-end). Connect the result to AcT Apply "
                "or Save Transport."
            ),
            inputs=[
                Samples.Input("samples", tooltip="From Collect Activations."),
                io.Combo.Input(
                    "method",
                    options=list(TRANSPORT_METHODS),
                    default="linear",
                    tooltip="linear: Linear-AcT (the paper's method); mean: shift by the mean difference; gaussian: match mean and spread; end-to-end: train the maps of all layers jointly through the model Collect ran (LinEAS; for few prompts; diffusion model, text encoder or both). It runs the collection's sampler calls or prompt encodings again for every training step, and holds a second copy of the steered part's weights meanwhile. On diffusion-model layers, start AcT Apply at strength 1.5 with it (measured on the shapes model; text-encoder layers were not measured).",
                ),
                io.Combo.Input(
                    "support",
                    options=SUPPORTS,
                    default="all",
                    tooltip="all (the default, for styles): move every activation; range: move only activations inside the source range, for removing a concept (e.g. the pink elephant); qNN: inside the NN%..(100-NN)% quantiles.",
                ),
                io.String.Input(
                    "description",
                    default="",
                    optional=True,
                    tooltip="Stored in the transport file.",
                ),
                io.Int.Input(
                    "training_steps",
                    default=DEFAULTS.steps,
                    min=1,
                    max=2000,
                    optional=True,
                    extra_dict=shown_when("method", END_TO_END),
                    tooltip="end-to-end: training steps; each runs every source batch forward and backward through the model.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=DEFAULTS.learning_rate,
                    min=0.0001,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    extra_dict=shown_when("method", END_TO_END),
                    tooltip="end-to-end: Adam's step size (in units of each layer's scale).",
                ),
                io.Float.Input(
                    "sparsity",
                    default=DEFAULTS.sparsity,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    optional=True,
                    advanced=True,
                    extra_dict=shown_when("method", END_TO_END),
                    tooltip="end-to-end: how strongly units that help little are switched off (0: keep every unit).",
                ),
                io.Combo.Input(
                    "init",
                    options=["identity", "linear"],
                    default=DEFAULTS.init,
                    optional=True,
                    advanced=True,
                    extra_dict=shown_when("method", END_TO_END),
                    tooltip="end-to-end: start from no change (identity) or from Linear-AcT's maps.",
                ),
                io.Int.Input(
                    "fit_seed",
                    default=DEFAULTS.seed,
                    min=0,
                    max=2**31 - 1,
                    optional=True,
                    advanced=True,
                    extra_dict=shown_when("method", END_TO_END),
                    tooltip="end-to-end: seeds the training (which batches each step uses).",
                ),
            ],
            outputs=[
                Transport.Output(
                    display_name="transport",
                    tooltip="The fitted maps: connect to AcT Apply, Strength Sweep, Bake or Save Transport.",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        samples,
        method: str,
        support: str,
        description: str = "",
        training_steps: int = DEFAULTS.steps,
        learning_rate: float = DEFAULTS.learning_rate,
        sparsity: float = DEFAULTS.sparsity,
        init: str = DEFAULTS.init,
        fit_seed: int = DEFAULTS.seed,
    ) -> io.NodeOutput:
        start = time.perf_counter()
        if method == END_TO_END:
            settings = EndToEnd(
                steps=training_steps,
                learning_rate=learning_rate,
                sparsity=sparsity,
                seed=fit_seed,
                init=init,
            )
            transport = fit_attached(samples, settings, support, description)
            losses = transport.info[END_TO_END]["loss"]
            note = (
                f"; loss {losses['plain']:.4g} (plain model) -> {losses['fitted']:.4g}"
                "\nthese maps move less than Linear-AcT's: on diffusion-model layers, start "
                "AcT Apply at strength 1.5"
            )
        else:
            transport = samples.fit(method, support)
            if description:
                transport = replace(transport, info={**transport.info, "description": description})
            note = ""
        seconds = time.perf_counter() - start
        summary = f"{transport.summary()}\nfitted in {seconds:.2f} s{note}"
        return io.NodeOutput(transport, ui=ui.PreviewText(summary))
