"""The shared workflows (workflows/*.json) against the node schemas, without ComfyUI (CI).

The schemas are the committed snapshot tests/data/object_info.json of the live server's
`/object_info` (test_workflows_comfyui.py keeps it equal to the server and says how to
regenerate it). Every file in the folder is checked, so a new workflow needs no new test.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from workflow_schema import (
    UI_ONLY,
    WorkflowError,
    check_workflow,
    control_modes,
    load_json,
    load_snapshot,
    options_of,
    slot_spec,
    to_api,
    widget_values,
    workflow_paths,
)

FEATURES = {
    "Style - watercolor - SD1.5",
    "Style - watercolor - SDXL",
    "Negation - no pink elephant - SD1.5",
    "Strength sweep - pencil sketch - SD1.5",
    "Save a transport - SD1.5",
    "Load a transport - SD1.5",
    "LLM steering - SmolLM2",
    "Style and negation - FLUX.1 dev",
    "Style and negation - SD3.5 Large",
}
# the file names users already have (so a shared workflow finds their checkpoint)
CHECKPOINTS = {
    "v1-5-pruned-emaonly.safetensors": 512,
    "sd_xl_base_1.0.safetensors": 1024,
    "flux1-dev-fp8.safetensors": 1024,  # Comfy-Org's FLUX.1 dev with its text encoders and VAE
    "sd3.5_large_fp8_scaled.safetensors": 1024,  # Comfy-Org's SD3.5 Large, likewise
}
LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")
BUILT_IN_LLM = "smollm2 (built-in)"  # works wherever the pack's model requirements are installed
PATHS = {path.stem: path for path in workflow_paths()}


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    return load_snapshot()


def nodes_of(workflow: dict[str, Any], node_type: str) -> list[dict[str, Any]]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def test_one_workflow_per_feature():
    assert set(PATHS) >= FEATURES


@pytest.mark.parametrize("name", sorted(PATHS))
def test_workflow_fits_the_node_schemas(name, schemas):
    workflow = load_json(PATHS[name])
    assert workflow.get("version") == 0.4 and workflow["nodes"], "not a UI-format workflow"
    assert check_workflow(workflow, schemas) == []
    prompt = to_api(workflow, schemas)
    outputs = [node for node in prompt.values() if schemas[node["class_type"]]["output_node"]]
    assert outputs, "nothing to run: the workflow has no output node"


@pytest.mark.parametrize("name", sorted(PATHS))
def test_notes_explain_the_steps_briefly(name):
    notes = [node for node in load_json(PATHS[name])["nodes"] if node["type"] in UI_ONLY]
    assert len(notes) >= 3
    for note in notes:
        text = note["widgets_values"][0]
        sentences = [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]
        assert 1 <= len(sentences) <= 3 and len(text) <= 300, text


@pytest.mark.parametrize("name", sorted(PATHS))
def test_defaults_are_for_real_use(name, schemas):
    """Common checkpoint names; the model's native resolution for collection and images;
    20-30 sampling steps; one collection step; collection seeds fixed (so it runs once); the
    nodes' default pooling (per token) and CFG branch (positive only)."""
    workflow = load_json(PATHS[name])
    for node_type, field, default in (
        ("AcTCollectActivations", "pooling", "tokens"),
        ("AcTApply", "apply_to", "positive only"),
    ):
        assert options_of(slot_spec(schemas[node_type], field))["default"] == default
        for node in nodes_of(workflow, node_type):
            assert widget_values(node, schemas)[field] == default
    checkpoints = [
        widget_values(node, schemas)["ckpt_name"]
        for node in nodes_of(workflow, "CheckpointLoaderSimple")
    ]
    assert set(checkpoints) <= set(CHECKPOINTS)
    if not checkpoints:
        return
    (resolution,) = {CHECKPOINTS[name] for name in checkpoints}
    for node in [node for kind in LATENTS for node in nodes_of(workflow, kind)]:
        values = widget_values(node, schemas)
        assert (values["width"], values["height"]) == (resolution, resolution)
    for node in nodes_of(workflow, "AcTCollectActivations"):
        values = widget_values(node, schemas)
        assert (values["width"], values["height"], values["steps"]) == (
            resolution,
            resolution,
            1,
        )
        assert control_modes(node, schemas) == {"seed": "fixed"}
    for kind in ("KSampler", "AcTStrengthSweep"):
        for node in nodes_of(workflow, kind):
            assert 20 <= widget_values(node, schemas)["steps"] <= 30


@pytest.mark.parametrize("name", sorted(PATHS))
def test_text_defaults_are_for_real_use(name, schemas):
    """The built-in model; short greedy answers (16-128 new tokens, temperature 0, seed fixed);
    chat on for a request (a prompt ending like a sentence), off for a sentence start that the
    model continues; the text shown by an output node (the LLM node is not one)."""
    workflow = load_json(PATHS[name])
    prompt = to_api(workflow, schemas)
    shown = {
        node["inputs"]["source"][0]
        for node in prompt.values()
        if node["class_type"] == "PreviewAny"
    }
    for node in nodes_of(workflow, "AcTLLMGenerate"):
        values = widget_values(node, schemas)
        assert values["model"] == BUILT_IN_LLM
        assert 16 <= values["max_new_tokens"] <= 128 and values["temperature"] == 0
        assert control_modes(node, schemas) == {"seed": "fixed"}
        text = prompt[str(node["id"])]["inputs"]["prompt"]
        if isinstance(text, list):  # linked: the value of the text node it comes from
            text = prompt[text[0]]["inputs"]["value"]
        assert values["chat"] == text.rstrip().endswith((".", "?", "!")), text
        assert str(node["id"]) in shown


def test_loaded_transports_are_saved_by_a_workflow(schemas):
    saved = {
        f"{widget_values(node, schemas)['filename']}.safetensors"
        for path in PATHS.values()
        for node in nodes_of(load_json(path), "AcTSaveTransport")
    }
    for name, path in PATHS.items():
        for node in nodes_of(load_json(path), "AcTLoadTransport"):
            assert widget_values(node, schemas)["transport_name"] in saved, name


def test_the_conversion_follows_the_front_end_rules(schemas):
    workflow = load_json(PATHS["Style - watercolor - SD1.5"])
    prompt = to_api(workflow, schemas)
    assert not any(node["class_type"] in UI_ONLY for node in prompt.values())
    (collect,) = [node for node in prompt.values() if node["class_type"] == "AcTCollectActivations"]
    assert collect["inputs"]["seed"] == 0 and collect["inputs"]["width"] == 512
    assert "control_after_generate" not in collect["inputs"]
    (apply,) = [node for node in prompt.values() if node["class_type"] == "AcTApply"]
    (fit_id,) = [key for key, node in prompt.items() if node["class_type"] == "AcTFitTransport"]
    assert apply["inputs"]["transport"] == [fit_id, 0]
    (batch,) = [node for node in prompt.values() if node["class_type"] == "BatchImagesNode"]
    assert set(batch["inputs"]) == {"images.image0", "images.image1"}


def test_a_linked_widget_input_is_sent_as_its_link(schemas):
    """A widget input fed by a link (the LLM nodes' prompt, from one text node) sends the link;
    the widget's own value, which the front end still saves, is not sent."""
    workflow = load_json(PATHS["LLM steering - SmolLM2"])
    prompt = to_api(workflow, schemas)
    texts = {
        key for key, node in prompt.items() if node["class_type"] == "PrimitiveStringMultiline"
    }
    generators = nodes_of(workflow, "AcTLLMGenerate")
    assert len(generators) == 4
    for node in generators:
        assert widget_values(node, schemas)["prompt"]  # saved
        source, slot = prompt[str(node["id"])]["inputs"]["prompt"]  # sent: the link
        assert source in texts and slot == 0


def broken(node_type: str, field: str, index: int | None, value: Any) -> dict[str, Any]:
    """ "Style - watercolor - SD1.5" with one change to the first node of `node_type` ("links":
    the links)."""
    workflow = copy.deepcopy(load_json(PATHS["Style - watercolor - SD1.5"]))
    target = workflow if node_type == "links" else nodes_of(workflow, node_type)[0]
    if index is None:
        target[field] = value
    elif value is DELETE:
        del target[field][index]
    elif isinstance(target[field][index], dict):
        target[field][index].update(value)
    else:
        target[field][index] = value
    return workflow


DELETE = object()
BROKEN = [
    ("AcTApply", "type", None, "AcTApplyOld", "unknown node type"),
    ("AcTApply", "widgets_values", 0, 5.0, "above the maximum"),
    ("AcTFitTransport", "widgets_values", 1, "some", "is not one of"),
    ("KSampler", "widgets_values", 1, "sometimes", "control mode"),
    ("EmptyLatentImage", "widgets_values", 2, DELETE, "widgets_values for"),
    ("AcTApply", "inputs", 0, {"link": None}, "required input transport"),
    ("AcTFitTransport", "outputs", 0, {"type": "MODEL"}, "not in the schema"),
    ("KSampler", "mode", None, 4, "mode 4"),
]


@pytest.mark.parametrize(("node_type", "field", "index", "value", "message"), BROKEN)
def test_the_check_finds_broken_workflows(node_type, field, index, value, message, schemas):
    workflow = broken(node_type, field, index, value)
    problems = check_workflow(workflow, schemas)
    assert any(message in problem for problem in problems), problems
    with pytest.raises(WorkflowError):
        to_api(workflow, schemas)


def test_the_check_finds_links_between_mismatched_types(schemas):
    workflow = copy.deepcopy(load_json(PATHS["Style - watercolor - SD1.5"]))
    (fit,) = nodes_of(workflow, "AcTFitTransport")
    (apply,) = nodes_of(workflow, "AcTApply")
    (checkpoint,) = nodes_of(workflow, "CheckpointLoaderSimple")
    link = next(link for link in workflow["links"] if link[1:4:2] == [fit["id"], apply["id"]])
    # feed AcT Apply's transport input from the checkpoint's MODEL output
    link[1], link[2], link[5] = checkpoint["id"], 0, "MODEL"
    checkpoint["outputs"][0]["links"].append(link[0])
    fit["outputs"][0]["links"].remove(link[0])
    problems = check_workflow(workflow, schemas)
    assert any("MODEL cannot feed transport" in problem for problem in problems), problems


@pytest.mark.parametrize("name", sorted(PATHS))
def test_every_template_has_a_thumbnail_of_its_screenshot(name):
    """ComfyUI's front end shows <name>.jpg beside <name>.json as the template's picture
    (made by tests/make_thumbnails.py from docs/screenshots/<name>.png)."""
    from PIL import Image

    thumbnail = PATHS[name].with_suffix(".jpg")
    screenshot = PATHS[name].parents[1] / "docs" / "screenshots" / f"{name}.png"
    with Image.open(thumbnail) as small, Image.open(screenshot) as large:
        assert small.format == "JPEG"
        assert abs(small.height / small.width - large.height / large.width) < 0.01


@pytest.mark.parametrize("name", sorted(PATHS))
def test_grid_labels_come_from_the_strengths_used(name, schemas):
    """No typed label names a strength (it would go stale when the strength changes): the
    labels of steered images come from the Strength Sweep or the AcT Apply node that made
    them."""
    prompt = to_api(load_json(PATHS[name]), schemas)
    for node in prompt.values():
        if node["class_type"] != "AcTLabelledGrid":
            continue
        labels, more = node["inputs"]["labels"], node["inputs"].get("more_labels")
        if isinstance(labels, list):
            assert prompt[labels[0]]["class_type"] == "AcTStrengthSweep" and labels[1] == 1
        else:
            assert not re.search(r"strength|\d", labels), labels
            assert more is not None and prompt[more[0]]["class_type"] == "AcTApply"


@pytest.mark.parametrize("name", sorted(PATHS))
def test_typed_prompt_boxes_say_which_is_source_and_which_is_target(name, schemas):
    """Filled prompt boxes show no input name: their first line, a note, says which is which
    (swapped boxes would invert the effect), and the prompts after it pair line for line."""
    for node in load_json(PATHS[name])["nodes"]:
        if node["type"] != "AcTCollectActivations":
            continue
        values = widget_values(node, schemas)
        linked = {item["name"] for item in node["inputs"] if item.get("link") is not None}
        typed = [side for side in ("source", "target") if f"{side}_prompts" not in linked]
        for side in typed:
            first = values[f"{side}_prompts"].splitlines()[0]
            assert first.startswith(f"# {side}:"), (name, side, first)
        if typed == ["source", "target"]:
            counts = [
                len([line for line in values[f"{side}_prompts"].splitlines() if line[:1] != "#"])
                for side in typed
            ]
            assert counts[0] == counts[1] >= 20, (name, counts)
