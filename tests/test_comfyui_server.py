"""The node pack in a real ComfyUI server, driven over HTTP like the front end drives it.

One server per module (CPU, loopback) with an SD1.5-shaped random checkpoint generated for
the session. Skipped unless COMFYUI_PATH names a ComfyUI checkout whose requirements this
Python has.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from comfy_server import (
    CHECKPOINT_NAME,
    PACK_FOLDER,
    ROOT,
    ComfyServer,
    PromptError,
    comfy_server,
)
from comfy_server import comfyui_checkout as require_comfyui
from sd15_checkpoint import cached_sd15_checkpoint

SOURCE = "a photo of a cat\na photo of a house\na photo of a boat"
TARGET = "a watercolor painting of a cat\na watercolor painting of a house\na watercolor of a boat"
TRANSPORT_FILE = "server_test"


def pack_node_ids() -> list[str]:
    """The node ids the pack registers, read from nodes/*.py without importing ComfyUI.

    nodes/extension.py lists the classes in NODES; each class names its id in
    `io.Schema(node_id=...)`.
    """
    extension = ast.parse((ROOT / "nodes" / "extension.py").read_text())
    names = next(
        [element.id for element in node.value.elts]
        for node in ast.walk(extension)
        if isinstance(node, ast.AnnAssign | ast.Assign)
        and "NODES" in [target.id for target in _targets(node)]
    )
    ids = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in names:
                ids[node.name] = next(
                    keyword.value.value
                    for keyword in ast.walk(node)
                    if isinstance(keyword, ast.keyword) and keyword.arg == "node_id"
                )
    assert sorted(ids) == sorted(names), f"no node_id found for {set(names) - set(ids)}"
    return [ids[name] for name in names]


def _targets(node: ast.AnnAssign | ast.Assign) -> list[ast.Name]:
    targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
    return [target for target in targets if isinstance(target, ast.Name)]


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An SD1.5-shaped random checkpoint, written once per test session (340 MB: removed at
    the end, as pytest keeps its last temporary directories)."""
    require_comfyui()  # skip before spending seconds on the file
    start = time.perf_counter()
    path = cached_sd15_checkpoint(tmp_path_factory.getbasetemp() / "sd15")
    print(f"\nSD1.5-shaped checkpoint ready in {time.perf_counter() - start:.1f} s")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(sd15_checkpoint: Path) -> Iterator[ComfyServer]:
    start = time.perf_counter()
    with comfy_server(sd15_checkpoint) as running:
        print(f"\nComfyUI ready in {time.perf_counter() - start:.1f} s")
        yield running


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict[str, Any]:
    return server.object_info()


def _input(info: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """(type, options) of an input of an /object_info entry, required or optional."""
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    kind, options = inputs[name]
    return kind, options


def test_object_info_lists_every_node_of_the_pack_in_category_act(object_info):
    ours = {
        name
        for name, info in object_info.items()
        if info["python_module"] == f"custom_nodes.{PACK_FOLDER}"
    }
    assert ours == set(pack_node_ids())
    for name in ours:
        info = object_info[name]
        assert info["category"] == "AcT", name
        assert info["display_name"] and info["description"], name


def test_object_info_inputs_types_and_defaults(object_info):
    expected = {
        "AcTCollectActivations": {
            "model": ("MODEL", None),
            "clip": ("CLIP", None),
            "source_prompts": ("STRING", None),  # a note saying which box it is (below)
            "where": ("COMBO", "diffusion model"),
            "layers": ("COMBO", "auto"),
            "seed": ("INT", 0),
            "width": ("INT", 512),
            "steps": ("INT", 1),
            "causal": ("BOOLEAN", False),
            "support": ("COMBO", "all"),  # causal only; as Fit Transport's, which must match
            "cache": ("COMBO", "use"),
        },
        "AcTFitTransport": {
            "samples": ("ACT_SAMPLES", None),
            "method": ("COMBO", "linear"),
            "support": ("COMBO", "all"),
        },
        "AcTApply": {
            "transport": ("ACT_TRANSPORT", None),
            "model": ("MODEL", None),
            "clip": ("CLIP", None),
            "strength_model": ("FLOAT", 1.0),
            "strength_clip": ("FLOAT", 1.0),
            "start_percent": ("FLOAT", 0.0),
            "end_percent": ("FLOAT", 1.0),
            "apply_to": ("COMBO", "positive only"),
            "block_weights": ("STRING", ""),
            "mask": ("MASK", None),
        },
        "AcTBake": {"transport": ("ACT_TRANSPORT", None), "strength": ("FLOAT", 1.0)},
        "AcTSaveTransport": {
            "transport": ("ACT_TRANSPORT", None),
            "filename": ("STRING", "my_style"),
            "overwrite": ("BOOLEAN", False),
        },
        "AcTLoadTransport": {"transport_name": ("COMBO", None)},
    }
    for node, inputs in expected.items():
        for name, (kind, default) in inputs.items():
            actual_kind, options = _input(object_info[node], name)
            assert actual_kind == kind, (node, name)
            if default is not None:
                assert options.get("default") == default, (node, name)
    collect = object_info["AcTCollectActivations"]
    assert set(collect["input"]["optional"]) >= {"model", "layer_regex"}
    assert "clip" in collect["input"]["required"]  # it encodes the prompts: the graph shows it
    assert _input(collect, "layer_regex")[1]["act_shown_when"] == {
        "widget": "layers",
        "values": ["custom regex"],
    }
    assert _input(collect, "batch_size")[1]["advanced"] is True
    assert _input(collect, "seed")[1]["control_after_generate"] == "fixed"  # collect once
    assert _input(collect, "source_prompts")[1]["multiline"] is True
    for side in ("source", "target"):  # a fresh node's boxes say which is which
        assert _input(collect, f"{side}_prompts")[1]["default"].startswith(f"# {side}:")
    assert set(_input(object_info["AcTFitTransport"], "method")[1]["options"]) >= {
        "linear",
        "mean",
    }
    for name in ("strength_model", "strength_clip"):
        strength = _input(object_info["AcTApply"], name)[1]
        assert (strength["min"], strength["max"]) == (-2.0, 3.0)
    assert _input(object_info["AcTApply"], "block_weights")[1]["advanced"] is True
    assert object_info["AcTSaveTransport"]["output_node"] is True


def test_custom_socket_types(object_info):
    assert object_info["AcTCollectActivations"]["output"] == ["ACT_SAMPLES"]
    assert object_info["AcTFitTransport"]["output"] == ["ACT_TRANSPORT"]
    assert object_info["AcTLoadTransport"]["output"] == ["ACT_TRANSPORT"]
    assert object_info["AcTApply"]["output"] == ["MODEL", "CLIP", "STRING"]


def test_every_input_has_a_tooltip(object_info):
    missing = [
        f"{node}.{name}"
        for node in pack_node_ids()
        for name in object_info[node]["input_order"].get("required", [])
        + object_info[node]["input_order"].get("optional", [])
        if not _input(object_info[node], name)[1].get("tooltip")
    ]
    assert not missing, f"inputs without a tooltip: {missing}"


COMMON_ALIASES = {"act", "activation transport", "steer", "style", "negation"}


def test_every_node_is_found_by_the_common_search_words(object_info):
    for node in pack_node_ids():
        aliases = set(object_info[node].get("search_aliases") or [])
        assert aliases >= COMMON_ALIASES, (node, sorted(aliases))


def test_every_output_has_a_tooltip_and_every_display_name_starts_with_act(object_info):
    for node in pack_node_ids():
        info = object_info[node]
        assert info["display_name"].startswith("AcT "), node
        tooltips = info.get("output_tooltips") or []
        assert len(tooltips) == len(info["output"]) and all(tooltips), (node, tooltips)
    assert object_info["AcTApply"]["display_name"] == "AcT Apply"


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    """One node of an API-format prompt; links are `[source_id, output_index]`."""
    return {"class_type": class_type, "inputs": inputs}


def sampling(model: list, first_id: int, prefix: str) -> dict[str, Any]:
    """CLIPTextEncode x2 → KSampler (4 steps, 64x64) → VAEDecode → SaveImage with node 1's
    CLIP and VAE; ids count from `first_id`, SaveImage's is the last (`first_id` + 5)."""
    positive, negative, latent, sampler, decode, save = (str(first_id + i) for i in range(6))
    return {
        positive: node("CLIPTextEncode", text="a cat", clip=["1", 1]),
        negative: node("CLIPTextEncode", text="", clip=["1", 1]),
        latent: node("EmptyLatentImage", width=64, height=64, batch_size=1),
        sampler: node(
            "KSampler",
            model=model,
            seed=7,
            steps=4,
            cfg=5.0,
            sampler_name="euler",
            scheduler="normal",
            positive=[positive, 0],
            negative=[negative, 0],
            latent_image=[latent, 0],
            denoise=1.0,
        ),
        decode: node("VAEDecode", samples=[sampler, 0], vae=["1", 2]),
        save: node("SaveImage", images=[decode, 0], filename_prefix=prefix),
    }


def apply_node(transport: list, strength: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """AcT Apply on node 1's MODEL, over the whole schedule, both CFG branches."""
    inputs = {"start_percent": 0.0, "end_percent": 1.0, "apply_to": "both branches", **overrides}
    return node(
        "AcTApply",
        transport=transport,
        model=["1", 0],
        strength_model=strength,
        strength_clip=strength,
        **inputs,
    )


def fit_workflow() -> dict[str, Any]:
    """Checkpoint → Collect → Fit → Apply → sampling (SaveImage 15), Save Transport (4), and
    the same sampling without Apply (SaveImage 25)."""
    collect = node(
        "AcTCollectActivations",
        model=["1", 0],
        clip=["1", 1],
        source_prompts=SOURCE,
        target_prompts=TARGET,
        where="diffusion model",
        layers="auto",
        layer_regex="",
        seed=0,
        width=64,
        height=64,
        steps=1,
        batch_size=3,
        causal=False,
        method="linear",
        support="range",
    )
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "2": collect,
        "3": node("AcTFitTransport", samples=["2", 0], method="linear", support="all"),
        "4": node("AcTSaveTransport", transport=["3", 0], filename=TRANSPORT_FILE, overwrite=True),
        "5": apply_node(["3", 0]),
        **sampling(["5", 0], 10, "steered"),
        **sampling(["1", 0], 20, "plain"),
    }


def load_workflow(strength: float = 1.0, **overrides: Any) -> dict[str, Any]:
    """Checkpoint + Load Transport → Apply (node 5) → sampling (SaveImage 15)."""
    return {
        "1": node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT_NAME),
        "3": node("AcTLoadTransport", transport_name=f"{TRANSPORT_FILE}.safetensors"),
        "5": apply_node(["3", 0], strength, **overrides),
        **sampling(["5", 0], 10, "loaded"),
    }


def _pixels(path: Path) -> bytes:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def fitted(server: ComfyServer) -> dict[str, Any]:
    start = time.perf_counter()
    result = server.run(fit_workflow())
    print(f"\ncollect/fit/apply/sample workflow: {time.perf_counter() - start:.1f} s")
    return result


def test_collect_fit_apply_sample_save_through_the_api(server, fitted):
    assert fitted["status"]["status_str"] == "success"
    (steered,) = server.output_files(fitted["outputs"], "15")
    (plain,) = server.output_files(fitted["outputs"], "25")
    assert steered.read_bytes().startswith(b"\x89PNG")
    assert _pixels(steered) != _pixels(plain)  # AcT Apply changed the image
    saved = server.base / "models" / "act" / f"{TRANSPORT_FILE}.safetensors"
    assert saved.is_file()
    assert f"saved {saved.name}" in fitted["outputs"]["4"]["text"][0]
    options = _input(server.object_info("AcTLoadTransport"), "transport_name")[1]["options"]
    assert saved.name in options  # the combo re-reads models/act
    # tests/conftest.py's cap of 0 reached the server: the collection cache kept nothing
    assert not list((server.base / "models" / "act").rglob("*.samples"))


def test_load_transport_apply_sample_through_the_api(server, fitted):
    result = server.run(load_workflow())
    assert result["status"]["status_str"] == "success"
    (loaded,) = server.output_files(result["outputs"], "15")
    (steered,) = server.output_files(fitted["outputs"], "15")
    assert _pixels(loaded) == _pixels(steered)  # the file holds the fitted transport


def test_an_invalid_prompt_is_refused_with_node_errors_naming_the_input(server, fitted):
    with pytest.raises(PromptError, match="strength_model") as refused:
        server.queue(load_workflow(strength=5.0))
    errors = refused.value.node_errors["5"]["errors"]
    assert {error["type"] for error in errors} == {"value_bigger_than_max"}
    assert {error["extra_info"]["input_name"] for error in errors} == {
        "strength_model",
        "strength_clip",
    }
    with pytest.raises(PromptError, match="start_percent") as refused:
        server.queue(load_workflow(start_percent=0.8, end_percent=0.2))
    assert refused.value.node_errors["5"]["class_type"] == "AcTApply"


def test_the_checkpoint_loaded_without_missing_keys(server, fitted):
    log = server.log.read_text(errors="replace")
    for warning in ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys"):
        assert warning not in log
    assert "IMPORT FAILED" not in log


def test_an_error_while_running_reports_the_node_and_the_message(server):
    prompt = fit_workflow()
    prompt["2"]["inputs"]["source_prompts"] = "# only a comment"
    with pytest.raises(
        PromptError, match=r"node 2 \(AcTCollectActivations\).*source_prompts is empty"
    ):
        server.run(prompt)
