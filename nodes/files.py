"""Nodes: Save Transport and Load Transport (files under models/act)."""

from __future__ import annotations

import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..act import ActError
from ..act import Transport as TransportData
from .types import CATEGORY, FOLDER, SEARCH_ALIASES, Transport

_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def transport_path(name: str, overwrite: bool) -> str:
    """Where to save `name` in the first models/act folder; numbered if it exists."""
    stem = _UNSAFE.sub("_", name.strip()).strip(". ")
    if not stem:
        raise ActError(f"invalid file name {name!r}: use letters, digits, '-', '_' or '.'")
    stem = stem.removesuffix(".safetensors")
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    path = os.path.join(folder, f"{stem}.safetensors")
    counter = 2
    while os.path.exists(path) and not overwrite:
        path = os.path.join(folder, f"{stem}_{counter}.safetensors")
        counter += 1
    return path


class SaveTransport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTSaveTransport",
            display_name="AcT Save Transport",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "save transport", "export transport"],
            description="Saves a transport to models/act as a .safetensors file (no pickle), to reuse in other graphs or share.",
            inputs=[
                Transport.Input("transport", tooltip="From Fit Transport."),
                io.String.Input(
                    "filename",
                    default="my_style",
                    tooltip="File name under models/act (.safetensors is added).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of that name instead of numbering a new one.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, transport, filename: str, overwrite: bool) -> io.NodeOutput:
        path = transport_path(filename, overwrite)
        transport.save(path)
        return io.NodeOutput(
            ui=ui.PreviewText(f"saved {os.path.basename(path)}\n{transport.summary()}")
        )


class LoadTransport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTLoadTransport",
            display_name="AcT Load Transport",
            category=CATEGORY,
            search_aliases=[*SEARCH_ALIASES, "load transport", "transport file"],
            description="Loads a transport file from models/act. AcT Apply checks that it fits the model it is applied to.",
            inputs=[
                io.Combo.Input(
                    "transport_name",
                    options=folder_paths.get_filename_list(FOLDER),
                    tooltip="A .safetensors file in models/act.",
                ),
            ],
            outputs=[
                Transport.Output(
                    display_name="transport",
                    tooltip="The loaded maps: connect to AcT Apply, Strength Sweep or Bake.",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, transport_name: str) -> str:
        path = folder_paths.get_full_path(FOLDER, transport_name)
        if path is None:
            return ""
        stat = os.stat(path)
        return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def validate_inputs(cls, transport_name: str) -> bool | str:
        if folder_paths.get_full_path(FOLDER, transport_name) is None:
            return f"transport file not found in models/{FOLDER}: {transport_name}"
        return True

    @classmethod
    def execute(cls, transport_name: str) -> io.NodeOutput:
        transport = TransportData.load(folder_paths.get_full_path_or_raise(FOLDER, transport_name))
        return io.NodeOutput(transport, ui=ui.PreviewText(transport.summary()))
