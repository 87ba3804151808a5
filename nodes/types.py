"""Socket types of the pack and the `models/act` folder for transport files."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

Transport = io.Custom("ACT_TRANSPORT")
Samples = io.Custom("ACT_SAMPLES")

CATEGORY = "AcT"
# what every node of the pack is found by in the node search, besides its own words
SEARCH_ALIASES = ["act", "activation transport", "steer", "steering", "style", "negation"]
FOLDER = "act"


def shown_when(widget: str, *values: object) -> dict:
    """An input's `extra_dict` that shows it on the canvas only while `widget` holds one of
    `values` (read by nodes/web/act_nodes.js; the input keeps its value while hidden)."""
    return {"act_shown_when": {"widget": widget, "values": list(values)}}


def register_transport_folder() -> None:
    """Register `models/act` (extra paths from extra_model_paths.yaml are kept)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        extensions.add(".safetensors")
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})


register_transport_folder()
