"""The shared workflows (workflows/*.json) in the real ComfyUI front end, in headless Chromium.

Each file is dropped into the front end the way a user drops it (`app.handleFile`). It must
load with no missing node, model or input, no error overlay and nothing logged as an error
or warning; the front end must queue exactly what the CI conversion (workflow_schema.to_api)
computes, and would save the same widget values and links. A screenshot of each graph, fitted
to the window, goes to pytest's temporary directory, or to ACT_SCREENSHOTS. Refresh the
committed ones (docs/screenshots/, the pictures in the README) with, from the repository root:

    ACT_SCREENSHOTS=docs/screenshots python -m pytest tests/test_workflows_frontend.py

Needs COMFYUI_PATH (a ComfyUI checkout with its front-end package installed) and Chromium with
chromedriver (Debian: chromium chromium-driver); skipped otherwise. The server gets empty
files under the checkpoint and transport names the workflows use: the front end only lists
names. The LLM node's "smollm2 (built-in)" needs no file: the node always offers it.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from comfy_browser import (
    Browser,
    chromium,
    chromium_binaries,
    fit_view,
    load_problems,
    load_workflow,
)
from comfy_server import ROOT, ComfyServer, comfy_server, comfyui_checkout
from workflow_schema import (
    BUILT_IN_CHOICES,
    FILE_COMBOS,
    load_json,
    load_snapshot,
    to_api,
    widget_values,
    workflow_paths,
)

import act

WIDTH, HEIGHT = 1920, 1200  # the screenshots' size
MAX_SCREENSHOT_BYTES = 500_000
SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no template browser on the first visit
    "Comfy.Minimap.Visible": False,  # the minimap would cover part of the graph
}
FOLDERS = {"ckpt_name": "checkpoints", "transport_name": "act", "model": "LLM"}
FEEDBACK_TRANSPORT = "feedback_test.safetensors"  # a real file: the feedback test loads it
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
WORKFLOWS = {path.stem: path for path in workflow_paths()}


def model_files(schemas: dict[str, Any], placeholder: Path) -> dict[str, Path]:
    """{"checkpoints/<name>": placeholder, "act/<name>": placeholder, ...} for every file name
    the workflows' file combos (checkpoint, transport, language model) use; built-in choices
    (the LLM node's "smollm2 (built-in)") are offered without a file."""
    files = {}
    for path in WORKFLOWS.values():
        for node in load_json(path)["nodes"]:
            for node_type, name in FILE_COMBOS:
                if node["type"] == node_type:
                    value = widget_values(node, schemas)[name]
                    if value not in BUILT_IN_CHOICES.get((node_type, name), set()):
                        files[f"{FOLDERS[name]}/{value}"] = placeholder
    return files


@pytest.fixture(scope="module")
def front_end(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ComfyServer, Browser]]:
    comfyui_checkout()
    chromium_binaries()
    placeholder = tmp_path_factory.mktemp("models") / "placeholder.safetensors"
    placeholder.write_bytes(b"")
    models = model_files(load_snapshot(), placeholder)
    models[f"act/{FEEDBACK_TRANSPORT}"] = tiny_transport(placeholder.parent / FEEDBACK_TRANSPORT)
    start = time.perf_counter()
    with (
        comfy_server(models=models, settings=SETTINGS) as server,
        chromium(WIDTH, HEIGHT) as browser,
    ):
        browser.open(server.url)
        browser.wait_for("window.app && window.app.rootGraph && window.LiteGraph", timeout=120)
        print(f"\nComfyUI front end ready in {time.perf_counter() - start:.1f} s")
        yield server, browser


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("ACT_SCREENSHOTS")
    if not folder:
        return tmp_path_factory.mktemp("screenshots")
    path = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_transport(path: Path) -> Path:
    """A transport file of two modules fitted on random samples."""
    generator = torch.Generator().manual_seed(0)
    sites = ["diffusion_model.input_blocks.0.0", "diffusion_model.out.0"]
    source = {site: torch.randn(8, 4, generator=generator) for site in sites}
    target = {site: torch.randn(8, 4, generator=generator) + 1 for site in sites}
    act.fit_transport(source, target, support="all").save(path)
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    header = path.read_bytes()[:24]
    assert header.startswith(b"\x89PNG\r\n\x1a\n"), f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def layout_problems(workflow: dict[str, Any]) -> list[str]:
    """Nodes that overlap another (title bars included) or straddle a group's border, at the
    positions and sizes the front end gave them."""

    def box(node: dict[str, Any]) -> tuple[float, float, float, float]:
        (x, y), (width, height) = node["pos"], node["size"]
        return x, y - TITLE_HEIGHT, x + width, y + height

    def name(node: dict[str, Any]) -> str:
        return f"{node['id']} ({node.get('title') or node['type']})"

    def overlap(a: tuple, b: tuple) -> bool:
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    nodes = workflow["nodes"]
    problems = [
        f"{name(first)} overlaps {name(second)}"
        for index, first in enumerate(nodes)
        for second in nodes[index + 1 :]
        if overlap(box(first), box(second))
    ]
    for group in workflow.get("groups") or []:
        x, y, width, height = group["bounding"]
        area = (x, y, x + width, y + height)
        for node in nodes:
            left, top, right, bottom = box(node)
            inside = area[0] <= left and area[1] <= top and right <= area[2] and bottom <= area[3]
            if overlap(box(node), area) and not inside:
                problems.append(f"{name(node)} sticks out of the group {group['title']!r}")
    return problems


def links_and_values(workflow: dict[str, Any]) -> tuple[list, dict]:
    """What a saved workflow means: its links, and every node's type and widget values."""
    nodes = {node["id"]: (node["type"], node.get("widgets_values")) for node in workflow["nodes"]}
    return sorted(workflow["links"]), nodes


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_loads_in_the_front_end_without_warnings(name, front_end, screenshots):
    server, browser = front_end
    path = WORKFLOWS[name]
    start = time.perf_counter()
    report = load_workflow(browser, path.name, path.read_text(encoding="utf-8"))
    assert load_problems(report) == []
    assert report["workflowName"] == name
    workflow = load_json(path)
    queued = {
        node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
        for node_id, node in report["prompt"].items()
    }
    assert queued == to_api(workflow, server.object_info())
    assert links_and_values(report["saved"]) == links_and_values(workflow)
    assert layout_problems(report["saved"]) == []
    scale = fit_view(browser)
    shot = browser.screenshot(screenshots / f"{name}.png")
    print(f"\n{name}: loaded and photographed in {time.perf_counter() - start:.1f} s "
          f"(zoom {scale:.0%}) -> {shot}")  # fmt: skip
    assert png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size <= MAX_SCREENSHOT_BYTES
    assert scale >= 0.6, "the graph is too spread out to read in a screenshot"


# Builds a graph on the canvas (Style Prompts and Load Transport each shown by Preview Any, and
# an unconnected Collect Activations), queues it, and reports what the nodes show.
FEEDBACK_GRAPH = """
const [transportName] = arguments;
const graph = app.rootGraph;
graph.clear();
const place = (type, x, y) => {
  const node = LiteGraph.createNode(type);
  node.pos = [x, y];
  graph.add(node);
  return node;
};
const widget = (node, name) => node.widgets.find((w) => w.name === name);
const visible = (node, name) => node.isWidgetVisible(widget(node, name));
const style = place("AcTStylePrompts", 40, 60);
style.connect(0, place("PreviewAny", 520, 60), 0);
const load = place("AcTLoadTransport", 40, 520);
widget(load, "transport_name").value = transportName;
load.connect(0, place("PreviewAny", 520, 520), 0);
const collect = place("AcTCollectActivations", 980, 60);
const before = graph.serialize();
const shown = {regex: visible(collect, "layer_regex"), causal: visible(collect, "causal"),
               method: visible(collect, "method"), prompts: visible(collect, "source_prompts")};
const layers = widget(collect, "layers");
layers.value = "custom regex";
layers.callback(layers.value);
shown.regexWithCustom = visible(collect, "layer_regex");
collect.showAdvanced = true;
shown.causalAdvanced = visible(collect, "causal");
shown.methodAdvanced = visible(collect, "method");
const causal = widget(collect, "causal");
causal.value = true;
causal.callback(causal.value);
shown.methodCausal = visible(collect, "method");
await app.queuePrompt(0, 1);
const summary = (node) => node.widgets.find((w) => w.name === "act_summary")?.value;
const deadline = Date.now() + 60000;
while (!(summary(style) && summary(load)) && Date.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 250));
}
const values = (saved, node) =>
  saved.nodes.find((n) => String(n.id) === String(node.id)).widgets_values;
const after = graph.serialize();
graph.setDirtyCanvas(true, true);
return {shown, style: summary(style), load: summary(load),
        savedBefore: [values(before, style), values(before, load)],
        savedAfter: [values(after, style), values(after, load)]};
"""


def test_nodes_show_what_they_did_and_mode_inputs_only_in_their_mode(front_end, screenshots):
    """After a run the nodes' summaries are drawn on them and not saved with the workflow;
    layer_regex shows only with 'custom regex', method only with causal, and advanced inputs
    only when the node shows them."""
    _, browser = front_end
    report = browser.run(FEEDBACK_GRAPH, FEEDBACK_TRANSPORT, timeout=90)
    assert report["shown"] == {
        "regex": False,
        "causal": False,
        "method": False,
        "prompts": True,
        "regexWithCustom": True,
        "causalAdvanced": True,
        "methodAdvanced": False,
        "methodCausal": True,
    }
    assert report["style"].startswith("40 pairs, e.g.")
    assert "2 modules, 8 units" in report["load"]
    assert report["savedAfter"] == report["savedBefore"]
    problems = [entry for entry in browser.console() if "act_nodes" in entry["text"]]
    assert problems == []
    shot = browser.screenshot(screenshots / "node_feedback.png")
    assert png_size(shot) == (WIDTH, HEIGHT)


def test_the_load_check_sees_missing_nodes_and_models(front_end):
    """A workflow with an unknown node and a checkpoint the server lacks is reported (runs
    last: the front end keeps its error overlay open)."""
    _, browser = front_end
    workflow = load_json(WORKFLOWS["Load a transport - SD1.5"])
    for node in workflow["nodes"]:
        if node["type"] == "AcTLoadTransport":
            node["type"] = "AcTNoSuchNode"
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"] = ["no_such_checkpoint.safetensors"]
    report = load_workflow(browser, "broken.json", json.dumps(workflow))
    problems = "\n".join(load_problems(report))
    assert "AcTNoSuchNode" in problems
    assert "no_such_checkpoint.safetensors" in problems
