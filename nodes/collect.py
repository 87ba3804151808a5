"""Node: Collect Activations."""

from __future__ import annotations

import os
import time

import comfy.model_management
import comfy.utils
import comfyui_version
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..act import ActError, ModulesNeverRanError, collect
from ..act.maps import METHODS
from ..act.recording import DEFAULT_MAX_TOKENS
from . import text_encoder
from .cache import MODES, SampleCache, cache_folder, cache_key, size_limit
from .collection import (
    WHERE,
    PromptProgress,
    check_connected,
    collection_batches,
    collection_root,
    describe_models,
    never_ran_error,
)
from .end_to_end import AttachedSamples, Replay
from .identity import clip_identity, model_identity
from .presets import LAYER_CHOICES
from .prompts import parse_prompts
from .types import CATEGORY, FOLDER, SEARCH_ALIASES, Samples, shown_when

SUPPORTS = ["range", "all", "q01", "q05", "q10"]
POOLING_DEFAULT = "tokens"
POOLINGS = ["tokens", "mean"]
# the prompt boxes' first lines: skipped as comments, they say which box is which once filled
SOURCE_LABEL = "# source: what AcT moves away from (e.g. plain captions), one prompt per line\n"
TARGET_LABEL = (
    "# target: what AcT moves towards (e.g. the same captions + a style), line for line\n"
)


def _sites_summary(sites: list[str], shown: int = 3) -> str:
    """The first and last sites, e.g. "joint_blocks.0:0, joint_blocks.0:1, … joint_blocks.23:1"."""
    names = [site.split(".", 1)[1] for site in sites]
    if len(names) <= 2 * shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])}, … {', '.join(names[-shown:])} ({len(names)} in all)"


class CollectActivations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTCollectActivations",
            display_name="AcT Collect Activations",
            category=CATEGORY,
            search_aliases=[
                *SEARCH_ALIASES,
                "collect activations",
                "record activations",
                "concept",
            ],
            description=(
                "Runs source and target prompts through the model and records the activations "
                "of the chosen layers (the positive branch of the first, noisiest denoising "
                "step by default): every token a sample with pooling 'tokens', one mean per "
                "prompt with 'mean' (channel maps are spatial means either way). Feed the "
                "result to Fit Transport."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Diffusion model to collect from (with its LoRAs and patches).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="Text encoder: encodes the prompts (always needed), and is collected from for 'text encoder'.",
                ),
                io.String.Input(
                    "source_prompts",
                    multiline=True,
                    default=SOURCE_LABEL,
                    tooltip="What to move away from, one prompt per line (e.g. plain captions); lines starting with # are notes, skipped.",
                ),
                io.String.Input(
                    "target_prompts",
                    multiline=True,
                    default=TARGET_LABEL,
                    tooltip="What to move towards, one prompt per line (e.g. the same captions with a style), line for line with the source; lines starting with # are skipped.",
                ),
                io.Combo.Input(
                    "where",
                    options=WHERE,
                    default="diffusion model",
                    tooltip="Which part of the model to collect from and later steer.",
                ),
                io.Combo.Input(
                    "layers",
                    options=LAYER_CHOICES,
                    default="auto",
                    tooltip="auto: all norm layers of UNets (SD1.5, SDXL) and text encoders; both streams of FLUX's double blocks and the first half of its single blocks; the outputs of every block of other DiTs (SD3, Qwen-Image, Lumina2, Wan, ...), found by a short dry run. The node's text lists what was chosen. 'exportable (folds into a LoRA)': only modules that AcT Export LoRA and AcT Bake fold completely (the affine LayerNorms of UNets and CLIP; in DiTs the Linear layers that write attention and MLP outputs to the tokens); fit it with support 'all' (Fit's default).",
                ),
                io.String.Input(
                    "layer_regex",
                    default="",
                    optional=True,
                    extra_dict=shown_when("layers", "custom regex"),
                    tooltip="With 'custom regex': one full-match pattern per line over module names, ':N' for element N of a tuple output.",
                ),
                io.Int.Input(
                    "seed",
                    advanced=True,
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Noise seed; source and target prompts at the same position share noise. Kept fixed, so collection runs once.",
                ),
                io.Int.Input(
                    "width", default=512, min=64, max=4096, step=8, tooltip="Collection resolution."
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=64,
                    max=4096,
                    step=8,
                    tooltip="Collection resolution.",
                ),
                io.Int.Input(
                    "steps",
                    advanced=True,
                    default=1,
                    min=1,
                    max=20,
                    tooltip="Record the first N denoising steps of a 20-step schedule (1: the first, highest-noise step, as in the paper).",
                ),
                io.Int.Input(
                    "batch_size",
                    advanced=True,
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Prompts per sampler call. Lower it if memory runs out.",
                ),
                io.Boolean.Input(
                    "causal",
                    advanced=True,
                    default=False,
                    tooltip="Fit layer after layer while collecting, each on the output of the layers already fitted (the paper's incremental estimation). Method and support then have to match Fit Transport's.",
                ),
                io.Combo.Input(
                    "method",
                    options=list(METHODS),
                    default="linear",
                    advanced=True,
                    extra_dict=shown_when("causal", True),
                    tooltip="Causal only: the estimator used while collecting.",
                ),
                io.Combo.Input(
                    "support",
                    options=SUPPORTS,
                    default="all",
                    advanced=True,
                    extra_dict=shown_when("causal", True),
                    tooltip="Causal only: the support used while collecting (Fit Transport's default is all too; the two must match).",
                ),
                io.Int.Input(
                    "frames",
                    default=1,
                    min=1,
                    max=257,
                    optional=True,
                    advanced=True,
                    tooltip="Video models (Wan, HunyuanVideo): frames of the collection video; 1 collects on stills, like an image model. Image models ignore it.",
                ),
                io.Combo.Input(
                    "pooling",
                    options=POOLINGS,
                    default=POOLING_DEFAULT,
                    optional=True,
                    advanced=True,
                    tooltip=(
                        f"tokens: each token a sample, at most {DEFAULT_MAX_TOKENS} per prompt "
                        "and layer (evenly spaced): in the text encoder the prompt's real tokens "
                        "(no padding); in the diffusion model the image tokens (a DiT's text "
                        "stream: its text tokens, padding included), so a one-word style or "
                        "object keeps its own samples. mean: one sample per prompt, the mean "
                        "over its tokens, as in the AcT paper. Channel maps (UNet ResNet norms) "
                        "are spatial means either way."
                    ),
                ),
                io.Combo.Input(
                    "cache",
                    options=MODES,
                    default="use",
                    optional=True,
                    advanced=True,
                    tooltip=(
                        "use: reuse the samples collected earlier from exactly these inputs "
                        "(model, LoRAs, CLIP, prompts, every setting), even after other graphs "
                        "ran or ComfyUI restarted; refresh: collect again and replace them; "
                        "off: always collect, keep nothing. Kept in models/act/cache, at most "
                        "ACT_COLLECTION_CACHE_GB gigabytes (default 2, least recently used "
                        "dropped first); delete that folder to clear it."
                    ),
                ),
            ],
            outputs=[
                Samples.Output(
                    display_name="samples",
                    tooltip="The pooled activations of both prompt lists: connect to Fit Transport.",
                )
            ],
        )

    @classmethod
    def execute(
        cls,
        source_prompts: str,
        target_prompts: str,
        where: str,
        layers: str,
        seed: int,
        width: int,
        height: int,
        steps: int,
        batch_size: int,
        causal: bool,
        method: str,
        support: str,
        clip,
        model=None,
        layer_regex: str = "",
        frames: int = 1,
        pooling: str = POOLING_DEFAULT,
        cache: str = "use",
    ) -> io.NodeOutput:
        prompts = {
            "source": parse_prompts(source_prompts, "source_prompts"),
            "target": parse_prompts(target_prompts, "target_prompts"),
        }
        check_connected(model, clip, where)
        settings = {
            "where": where,
            "layers": layers,
            "layer_regex": layer_regex if layers == "custom regex" else "",
            "seed": seed,
            "size": [width, height, frames],
            "steps": steps,
            "batch_size": batch_size,
            "causal": [method, support] if causal else None,
            "pooling": [pooling, DEFAULT_MAX_TOKENS],
        }
        size = (width, height, frames)
        replay = Replay(model, clip, where, prompts, seed, size, steps, batch_size, pooling, causal)
        store = _sample_cache(cache)
        key = cache_key(_key_parts(model, clip, prompts, settings)) if store else None
        if store and cache == "use":
            cached = store.load(key)
            if cached is not None:
                summary = (
                    f"{cached.model_class}: {cached.summary()}, from the collection cache "
                    f"({store.path(key)}; cache 'refresh' collects again)"
                    f"\nlayers ({layers}): {_sites_summary(cached.sites)}"
                )
                return io.NodeOutput(AttachedSamples.of(cached, replay), ui=ui.PreviewText(summary))
        root, sites = collection_root(model, clip, where, layers, layer_regex, size)
        if causal and where != "diffusion model":
            batch_size = 1  # text-encoder modules run once per prompt
        # causal collection reruns batches, so its bar counts the modules fitted instead
        by_prompt = None if causal else PromptProgress(sum(map(len, prompts.values())))
        batches = collection_batches(
            model,
            clip,
            where,
            prompts,
            batch_size=batch_size,
            seed=seed,
            size=size,
            steps=steps,
            sites=sites,
            progress=by_prompt,
        )
        by_module = comfy.utils.ProgressBar(len(sites)) if causal else None

        def report(done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            if by_module is not None:
                by_module.update_absolute(done, total)

        models = describe_models(model, clip, where)
        start = time.perf_counter()
        try:
            samples = collect(
                root,
                sites,
                batches,
                causal=causal,
                method=method,
                support=support,
                pooling=pooling,
                progress=report,
                info={"source_prompts": prompts["source"], "target_prompts": prompts["target"]},
            )
        except ModulesNeverRanError as error:
            raise never_ran_error(error, root, models, layers) from None
        if where == "both" and steps > 1 and not causal and not samples.pooling.per_token:
            prefix = f"{text_encoder.PREFIX}."
            samples.repeat_each([s for s in samples.sites if s.startswith(prefix)], steps)
        samples.model_class = models
        seconds = time.perf_counter() - start
        note = "" if store is None else _store(store, key, samples)
        summary = (
            f"{samples.model_class}: {samples.summary()} in {seconds:.1f} s{note}"
            f"\nlayers ({layers}): {_sites_summary(sites)}"
        )
        return io.NodeOutput(AttachedSamples.of(samples, replay), ui=ui.PreviewText(summary))


def _sample_cache(mode: str) -> SampleCache | None:
    """The collection cache, or None with cache 'off' or a size cap of 0."""
    if mode not in MODES:
        raise ActError(f"unknown cache mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "off":
        return None  # without reading ACT_COLLECTION_CACHE_GB: a wrong value cannot stop it
    limit = size_limit()
    if limit == 0:
        return None
    return SampleCache(cache_folder(os.path.join(folder_paths.models_dir, FOLDER, "cache")), limit)


def _key_parts(model, clip, prompts: dict[str, list[str]], settings: dict) -> dict:
    """What determines a collection: prompts, settings, the CLIP, the MODEL where it is
    collected from, and the versions of torch and ComfyUI."""
    uses_model = settings["where"] in ("diffusion model", "both")
    return {
        "prompts": prompts,
        "settings": settings,
        "clip": clip_identity(clip),
        "model": model_identity(model) if uses_model else None,
        "versions": [torch.__version__, comfyui_version.__version__],
    }


def _store(store: SampleCache, key: str, samples) -> str:
    """Stores the samples; a note for the node's text when they could not be kept."""
    try:
        kept = store.store(key, samples)
    except OSError as error:
        return f" (not cached: cannot write {store.folder}: {error.strerror})"
    return "" if kept else f" (not cached: larger than the {store.max_bytes / 1e9:g} GB cap)"
