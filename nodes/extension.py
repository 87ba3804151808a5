"""The pack's ComfyExtension: every node it registers."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import ApplyAcT
from .bake import BakeAcT
from .captions import StylePrompts
from .collect import CollectActivations
from .export import ExportLoRA
from .files import LoadTransport, SaveTransport
from .fit import FitTransport
from .llm import LLMGenerate
from .sweep import LabelledGrid, StrengthSweep

NODES: list[type[io.ComfyNode]] = [
    StylePrompts,
    CollectActivations,
    FitTransport,
    ApplyAcT,
    BakeAcT,
    ExportLoRA,
    SaveTransport,
    LoadTransport,
    StrengthSweep,
    LabelledGrid,
    LLMGenerate,
]


class ActExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
