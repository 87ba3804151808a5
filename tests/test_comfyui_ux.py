"""Making a style in a real ComfyUI: Style Prompts feeding Collect Activations, and collection
results that persist on disk across graphs and restarts.

In-process with tiny models (forward calls counted), and over HTTP on a server with the
SD1.5-shaped test checkpoint (another graph in between, then a restart). Skipped unless
COMFYUI_PATH names a ComfyUI checkout importable by this Python.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_server import CHECKPOINT_NAME, comfy_server
from comfy_server import comfyui_checkout as require_comfyui
from comfy_support import (
    PACK,
    comfyui_path,
    encode,
    load_pack,
    start_comfy,
    temporary_base,
    tiny_clip,
    tiny_model,
)
from sd15_checkpoint import cached_sd15_checkpoint

CAPTIONS = "a cat on a sofa\na dog in a field\na boat on a lake\na house on a hill"
HIT = "from the collection cache"


@pytest.fixture(scope="module")
def pack():
    """The nodes tested here; ComfyUI starts once per process, so an earlier module's
    start is reused (its base folder may be gone: the cache gets a folder of its own)."""
    comfyui_path()
    base = None if "folder_paths" in sys.modules else temporary_base()
    if base is not None:
        start_comfy(base)
    load_pack()
    modules = {
        name: importlib.import_module(f"{PACK}.nodes.{name}")
        for name in ("captions", "collect", "fit", "sweep", "llm")
    }
    nodes = (
        modules["captions"].StylePrompts,
        modules["collect"].CollectActivations,
        modules["fit"].FitTransport,
        modules["sweep"].StrengthSweep,
        modules["llm"].LLMGenerate,
    )
    yield SimpleNamespace(nodes={node.define_schema().node_id: node for node in nodes})
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "collection-cache"
    monkeypatch.setenv("ACT_COLLECTION_CACHE_DIR", str(folder))
    monkeypatch.delenv("ACT_COLLECTION_CACHE_GB", raising=False)
    return folder


class Calls:
    """Counts forward calls of the diffusion model and the text encoder."""

    def __init__(self, model, clip) -> None:
        self.count = 0
        encoders = list(clip.cond_stage_model.children())  # e.g. clip_l: its forward runs
        modules = [model.model.diffusion_model, *encoders]
        self.handles = [module.register_forward_hook(self._hook) for module in modules]

    def _hook(self, *_) -> None:
        self.count += 1

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *_) -> None:
        for handle in self.handles:
            handle.remove()


def style_prompts(pack, **overrides) -> tuple[str, str]:
    arguments = dict(
        caption_set="custom", custom_captions=CAPTIONS, add=", ink drawing", placement="suffix",
        remove="",
    )  # fmt: skip
    arguments.update(overrides)
    return tuple(pack.nodes["AcTStylePrompts"].execute(**arguments).result)


def collect(pack, model, clip, source: str, target: str, **overrides):
    """Collect Activations' samples and its text, counting the model's forward calls."""
    arguments = dict(
        model=model, clip=clip, source_prompts=source, target_prompts=target,
        where="diffusion model", layers="auto", seed=0, width=64, height=64, steps=1,
        batch_size=2, causal=False, method="linear", support="range",
    )  # fmt: skip
    arguments.update(overrides)
    with Calls(model, clip) as calls:
        output = pack.nodes["AcTCollectActivations"].execute(**arguments)
    return SimpleNamespace(
        samples=output.result[0], text=output.ui.as_dict()["text"][0], calls=calls.count
    )


def assert_same_samples(left, right) -> None:
    assert left.sites == right.sites
    for side in ("source", "target"):
        for site, values in getattr(left, side).items():
            assert torch.equal(values, getattr(right, side)[site]), (side, site)
    assert (left.info, left.model_class, left.pooling) == (
        right.info,
        right.model_class,
        right.pooling,
    )


def test_style_prompts_give_collect_the_captions_and_the_styled_captions(pack, cache_dir):
    source, target = style_prompts(pack)
    result = collect(pack, tiny_model(), tiny_clip(), source, target)
    captions = CAPTIONS.splitlines()
    assert result.samples.info["source_prompts"] == captions
    assert result.samples.info["target_prompts"] == [f"{line}, ink drawing" for line in captions]
    assert result.calls > 0 and HIT not in result.text


def test_style_prompts_remove_a_concept_and_name_a_caption_without_it(pack):
    captions = "a town square, with a pink elephant\na beach, With a pink elephant"
    source, target = style_prompts(
        pack, custom_captions=captions, add="", remove="with a pink elephant"
    )
    assert (source, target) == (captions, "a town square\na beach")
    with pytest.raises(Exception, match=r"missing from 1 of the 3 captions, e.g\. 'a harbour'"):
        style_prompts(pack, custom_captions=f"{captions}\na harbour", remove="with a pink elephant")


def test_style_prompts_refuse_custom_captions_left_behind_a_built_in_set(pack):
    source, _ = style_prompts(pack, caption_set="animals", custom_captions="")
    assert len(source.splitlines()) == 40
    with pytest.raises(Exception, match="choose 'custom'"):
        style_prompts(pack, caption_set="animals")


def test_collecting_again_with_new_objects_reads_the_disk_without_running_the_model(
    pack, cache_dir
):
    """A restart or another graph in between: equal inputs, new MODEL and CLIP objects."""
    source, target = style_prompts(pack)
    first = collect(pack, tiny_model(seed=3), tiny_clip(seed=3), source, target)
    start = time.perf_counter()
    again = collect(pack, tiny_model(seed=3), tiny_clip(seed=3), source, target)
    assert first.calls > 0 and again.calls == 0
    assert HIT in again.text and str(cache_dir) in again.text
    assert_same_samples(first.samples, again.samples)
    assert time.perf_counter() - start < 5.0
    assert len(list(cache_dir.glob("*.samples"))) == 1


def test_a_changed_prompt_setting_or_model_collects_again(pack, cache_dir):
    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    assert collect(pack, model, clip, source, target).calls > 0
    assert collect(pack, model, clip, source, target).calls == 0
    _, other_target = style_prompts(pack, add=", oil painting")
    changes = [
        dict(target=other_target),
        dict(seed=1),
        dict(width=72),
        dict(pooling="mean"),
        dict(where="text encoder"),
        dict(model=tiny_model(seed=1)),
        dict(clip=tiny_clip(seed=1)),
    ]
    for change in changes:
        arguments = {"model": model, "clip": clip, "source": source, "target": target, **change}
        assert collect(pack, **arguments).calls > 0, change
    assert len(list(cache_dir.glob("*.samples"))) == 1 + len(changes)


def test_a_lora_and_its_strength_collect_again_and_the_same_lora_does_not(pack, cache_dir):
    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    key = next(k for k in model.model.state_dict() if k.endswith("attn2.to_k.weight"))
    delta = 0.1 * torch.randn(model.model.state_dict()[key].shape)

    def with_lora(strength: float):
        patched = model.clone()
        patched.add_patches({key: ("diff", (delta,))}, strength)
        return patched

    plain = collect(pack, model, clip, source, target)
    lora = collect(pack, with_lora(1.0), clip, source, target)
    assert plain.calls > 0 and lora.calls > 0
    site = plain.samples.sites[-1]
    assert not torch.equal(plain.samples.target[site], lora.samples.target[site])
    same = collect(pack, with_lora(1.0), clip, source, target)
    assert same.calls == 0
    assert_same_samples(lora.samples, same.samples)
    assert collect(pack, with_lora(0.5), clip, source, target).calls > 0
    assert collect(pack, model, clip, source, target).calls == 0  # the plain model's entry


def test_cache_off_stores_nothing_and_refresh_collects_again(pack, cache_dir):
    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    assert collect(pack, model, clip, source, target, cache="off").calls > 0
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    collect(pack, model, clip, source, target)
    (entry,) = cache_dir.glob("*.samples")
    written = entry.stat().st_mtime_ns
    refreshed = collect(pack, model, clip, source, target, cache="refresh")
    assert refreshed.calls > 0 and HIT not in refreshed.text
    assert entry.stat().st_mtime_ns > written
    assert collect(pack, model, clip, source, target, cache="off").calls > 0


def test_a_cap_of_zero_turns_the_cache_off(pack, cache_dir, monkeypatch):
    monkeypatch.setenv("ACT_COLLECTION_CACHE_GB", "0")
    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    for _ in range(2):
        assert collect(pack, model, clip, source, target).calls > 0
    assert not cache_dir.exists()


def test_a_wrong_cap_is_named_and_cache_off_does_not_read_it(pack, cache_dir, monkeypatch):
    monkeypatch.setenv("ACT_COLLECTION_CACHE_GB", "two")
    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    with pytest.raises(Exception, match="ACT_COLLECTION_CACHE_GB='two'"):
        collect(pack, model, clip, source, target)
    assert collect(pack, model, clip, source, target, cache="off").calls > 0


# --- feedback: progress bars, and which inputs the canvas shows ------------------------


@pytest.fixture
def progress_updates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Every (value, total) a ComfyUI progress bar sends, unthrottled."""
    import comfy.utils

    updates: list[tuple[float, float]] = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0)
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_PERCENT", 0.0)
    monkeypatch.setattr(
        comfy.utils,
        "PROGRESS_BAR_HOOK",
        lambda value, total, preview, node_id=None: updates.append((value, total)),
    )
    return updates


@pytest.mark.parametrize("where", ["diffusion model", "text encoder"])
def test_collection_progress_counts_prompts_and_moves_inside_a_batch(
    pack, cache_dir, progress_updates, where
):
    source, target = style_prompts(pack)  # 4 + 4 prompts, in batches of 4
    collect(pack, tiny_model(), tiny_clip(), source, target, where=where, batch_size=4)
    values = [value for value, _ in progress_updates]
    assert {total for _, total in progress_updates} == {8}
    assert values == sorted(values) and values[-1] == 8
    assert any(0 < value < 4 for value in values), "nothing moved before the first batch ended"


def test_cancelling_stops_collection_inside_the_first_batch(pack, cache_dir, progress_updates):
    import comfy.model_management as mm

    model, clip = tiny_model(), tiny_clip()
    source, target = style_prompts(pack)
    cancel_at_first_update = lambda *_, **__: mm.interrupt_current_processing(True)  # noqa: E731
    progress_updates.clear()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_HOOK = cancel_at_first_update
    finished = []
    counter = model.model.diffusion_model.register_forward_hook(lambda *_: finished.append(1))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            collect(pack, model, clip, source, target, batch_size=4, cache="off")
    finally:
        mm.interrupt_current_processing(False)
        counter.remove()
    assert finished == []  # the first sampler call was stopped before it finished
    for module in (model.model.diffusion_model, clip.cond_stage_model):
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def test_strength_sweep_fills_one_bar_over_every_step_of_every_strength(pack, progress_updates):
    model, clip = tiny_model(), tiny_clip()
    samples = collect(pack, model, clip, *style_prompts(pack), cache="off").samples
    transport = pack.nodes["AcTFitTransport"].execute(samples, "linear", "all").result[0]
    conditioning = [encode(clip, text) for text in ("a cat", "")]
    progress_updates.clear()
    pack.nodes["AcTStrengthSweep"].execute(
        model=model, transport=transport, positive=conditioning[0], negative=conditioning[1],
        latent_image={"samples": torch.zeros([1, 4, 8, 8])}, strengths="0, 0.5, 1", seed=0,
        steps=4, cfg=5.0, sampler_name="euler", scheduler="normal",
    )  # fmt: skip
    assert progress_updates == [(value, 12) for value in range(1, 13)]


def test_every_input_shown_only_in_a_mode_names_a_widget_and_values_it_offers(pack):
    rules = 0
    for node_id, node in pack.nodes.items():
        inputs = {item.id: item for item in node.define_schema().inputs}
        for item in inputs.values():
            rule = item.extra_dict.get("act_shown_when")
            if rule is None:
                continue
            rules += 1
            controlling = inputs.get(rule["widget"])
            assert controlling is not None, (node_id, item.id, rule)
            offered = getattr(controlling, "options", None) or [True, False]
            assert rule["values"] and set(rule["values"]) <= set(offered), (node_id, item.id)
    assert rules >= 6  # layer_regex, method, support, custom_captions, the LLM's two sentences


def test_collect_shows_a_short_simple_view_and_requires_the_clip(pack):
    inputs = pack.nodes["AcTCollectActivations"].define_schema().inputs
    simple = [
        item.id for item in inputs if not item.advanced and "act_shown_when" not in item.extra_dict
    ]
    assert simple == [
        "model", "clip", "source_prompts", "target_prompts", "where", "layers", "width", "height",
    ]  # fmt: skip
    assert {item.id: item.optional for item in inputs}["clip"] is False


# --- over HTTP: another graph in between, then a restart ---------------------------------


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The SD1.5-shaped checkpoint, shared with other modules of the session."""
    require_comfyui()
    yield cached_sd15_checkpoint(tmp_path_factory.getbasetemp() / "sd15")


def style_graph(add: str, filename: str) -> dict:
    """Checkpoint → Style Prompts → Collect (node 3) → Fit → Save Transport."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {
            "class_type": "AcTStylePrompts",
            "inputs": {
                "caption_set": "custom",
                "custom_captions": CAPTIONS,
                "add": add,
                "placement": "suffix",
                "remove": "",
            },
        },
        "3": {
            "class_type": "AcTCollectActivations",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "source_prompts": ["2", 0],
                "target_prompts": ["2", 1],
                "where": "diffusion model",
                "layers": "layer norms only",
                "layer_regex": "",
                "seed": 0,
                "width": 64,
                "height": 64,
                "steps": 1,
                "batch_size": 4,
                "causal": False,
                "method": "linear",
                "support": "range",
                "cache": "use",
            },
        },
        "4": {
            "class_type": "AcTFitTransport",
            "inputs": {"samples": ["3", 0], "method": "linear", "support": "all"},
        },
        "5": {
            "class_type": "AcTSaveTransport",
            "inputs": {"transport": ["4", 0], "filename": filename, "overwrite": True},
        },
    }


def run_style(server, add: str, filename: str) -> tuple[str, bytes]:
    """Collect's text and the saved transport's bytes."""
    result = server.run(style_graph(add, filename), timeout=600)
    saved = server.base / "models" / "act" / f"{filename}.safetensors"
    return result["outputs"]["3"]["text"][0], saved.read_bytes()


def test_the_style_graph_after_another_graph_and_after_a_restart_does_not_collect(
    sd15_checkpoint, cache_dir
):
    with comfy_server(sd15_checkpoint) as server:
        text, transport = run_style(server, ", watercolor painting", "watercolor")
        assert HIT not in text
        other, _ = run_style(server, ", pencil sketch", "sketch")  # another graph
        assert HIT not in other
        again, transport_again = run_style(server, ", watercolor painting", "watercolor")
        assert HIT in again
        assert transport_again == transport
    with comfy_server(sd15_checkpoint) as restarted:
        after, transport_after = run_style(restarted, ", watercolor painting", "watercolor")
    assert HIT in after
    assert transport_after == transport
    assert len(list(cache_dir.glob("*.samples"))) == 2
