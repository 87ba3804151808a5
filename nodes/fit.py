"""Node: Fit Transport."""

from __future__ import annotations

import time
from dataclasses import replace

from comfy_api.latest import io, ui

from ..act.maps import METHODS
from .collect import SUPPORTS
from .types import CATEGORY, SEARCH_ALIASES, Samples, Transport


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
            ],
            description=(
                "Fits, for every unit of the collected layers, the optimal-transport map from "
                "the source activations to the target ones (Linear-AcT). Connect the result "
                "to AcT Apply or Save Transport."
            ),
            inputs=[
                Samples.Input("samples", tooltip="From Collect Activations."),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="linear",
                    tooltip="linear: Linear-AcT (the paper's method); mean: shift by the mean difference; gaussian: match mean and spread.",
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
            ],
            outputs=[
                Transport.Output(
                    display_name="transport",
                    tooltip="The fitted maps: connect to AcT Apply, Strength Sweep, Bake or Save Transport.",
                )
            ],
        )

    @classmethod
    def execute(cls, samples, method: str, support: str, description: str = "") -> io.NodeOutput:
        start = time.perf_counter()
        transport = samples.fit(method, support)
        if description:
            transport = replace(transport, info={**transport.info, "description": description})
        summary = f"{transport.summary()}\nfitted in {time.perf_counter() - start:.2f} s"
        return io.NodeOutput(transport, ui=ui.PreviewText(summary))
