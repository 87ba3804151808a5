"""The shapes-world benchmark: its data, scorers and trained model, and AcT measured on it.

The model folder `bench/shapes/model` is committed (trained once with
`python -m bench.shapes.train`); these tests only sample from it, on a few images.
"""

import numpy as np
import pytest
import torch

from bench.shapes import steering
from bench.shapes.captions import COLOUR_WORDS, caption, training_caption, vocabulary
from bench.shapes.fidelity import generate, heldout, score
from bench.shapes.model import MODEL_DIR, build_tokenizer, load_pipeline
from bench.shapes.scorers import detect_objects, validate
from bench.shapes.world import COLOURS, render, sample_records


def test_scenes_render_deterministically_and_scorers_read_them_back():
    records = sample_records(5, seed=42)
    assert records == sample_records(5, seed=42)
    assert all(np.array_equal(render(r), render(r)) for r in records)
    accuracies = validate(300, seed=99)
    assert min(accuracies.values()) >= 0.99, accuracies


def test_scorers_see_a_recoloured_or_removed_object():
    record = next(r for r in sample_records(50, seed=7) if len({o.shape for o in r.objects}) == 2)
    shape = record.objects[0].shape
    assert {d.colour for d in detect_objects(render(record.recoloured("red")))} == {"red"}
    assert shape not in {d.shape for d in detect_objects(render(record.without(shape)))}


def test_style_fitting_captions_are_paired_and_of_the_evaluations_kind():
    source, target = steering.style_fit_prompts(64)
    for plain, red in zip(source, target, strict=True):
        words, red_words = plain.split(), red.split()
        assert len(words) == len(red_words)
        changed = {(a, b) for a, b in zip(words, red_words, strict=True) if a != b}
        assert changed and {b for _, b in changed} <= {"red", "a"}, (plain, red)  # "an orange"
    report = {prompt for _, prompt in steering.style_eval_prompts(64)}
    tuning = {prompt for _, prompt in steering.style_eval_prompts(64, prompts="tuning")}
    assert len(report & tuning) < 4  # other scenes; only short captions can coincide


def test_paired_captions_differ_only_in_the_colour_words():
    record = next(r for r in sample_records(20, seed=3) if len(r.objects) == 2)
    plain = caption(record, seed=11, colours=False, background=True)
    styled = caption(record, seed=11, colour_phrase="red", background=True)
    named = caption(record, seed=11, background=True)
    assert styled.replace(" in red", "") == plain
    assert all(any(word in named for word in COLOUR_WORDS[obj.colour]) for obj in record.objects)
    assert not any(colour in plain for colour in COLOURS)


def test_tokenizer_knows_every_caption_word():
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)
    texts = [training_caption(r, rng) for r in sample_records(300, seed=5)]
    texts += steering.style_fit_prompts(32)[1] + steering.negation_fit_prompts(32)[1]
    ids = tokenizer(texts).input_ids
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert max(len(row) for row in ids) <= tokenizer.model_max_length
    assert set(vocabulary()) <= set(tokenizer.get_vocab())


def test_fitting_and_evaluation_prompts_never_share_a_scene():
    fitting = set().union(*steering.negation_fit_prompts(256))
    evaluation = steering.negation_eval_prompts(128, exclude=fitting)
    assert len(evaluation) == 128
    assert not fitting & {prompt for _, prompt in evaluation}
    assert all(
        sum(o.shape == steering.NEGATED_SHAPE for o in r.objects) == 1 for r, _ in evaluation
    )
    style_records = [r for r, _ in steering.style_eval_prompts(64)]
    assert all(o.colour != steering.STYLE_COLOUR for r in style_records for o in r.objects)


@pytest.fixture(scope="module")
def pipe():
    assert (MODEL_DIR / "model_index.json").is_file(), f"the trained model is missing: {MODEL_DIR}"
    return load_pipeline()


def test_trained_model_draws_what_its_captions_say(pipe):
    records, prompts = map(list, zip(*heldout(24), strict=True))
    report = score(generate(pipe, prompts), records)
    print(report)
    assert report["match"] >= 0.6, report  # 80% on 300 held-out captions (README)
    assert min(report["objects found"].values()) >= 0.7, report


def _run(pipe, task: str, strengths: tuple[float, ...]) -> list[dict]:
    """The task's default configuration on 24 reported held-out captions, fitted from 128 + 128
    paired captions: [ceiling, λ = 0, strengths...] rows of scores."""
    spec = steering.TASKS[task]
    source, target = spec.fit_prompts(128)
    held_out = spec.eval_prompts(24, exclude={*source, *target})
    records, prompts = map(list, zip(*held_out, strict=True))
    transport = steering.fit(pipe, spec.default, source, target, {})
    plain = generate(pipe, prompts)
    with steering.steered(pipe, transport, spec.default, 0.0):
        assert np.array_equal(generate(pipe, prompts), plain)  # λ = 0 is bit-identical
    rows = [steering.ceiling(pipe, task, records), spec.scores(plain, records)]
    for strength in strengths:
        with steering.steered(pipe, transport, spec.default, strength):
            rows.append(spec.scores(generate(pipe, prompts), records))
    assert np.array_equal(generate(pipe, prompts), plain)  # nothing left patched
    print(task, rows)
    return rows


def test_style_transport_turns_objects_red_and_keeps_shapes(pipe):
    ceiling, plain, half, full = _run(pipe, "style", (0.5, 1.0))
    assert ceiling["styled"] >= 0.8 and plain["styled"] <= 0.1, (ceiling, plain)
    assert half["styled"] >= 0.25 and half["shapes kept"] >= 0.8 * ceiling["shapes kept"]
    assert full["styled"] >= 0.8, full


def test_negation_transport_removes_triangles(pipe):
    ceiling, plain, half, full = _run(pipe, "negation", (0.25, 0.5))
    assert ceiling["present"] <= 0.1 and plain["present"] >= 0.7, (ceiling, plain)
    assert half["present"] <= plain["present"] - 0.2, half
    assert full["present"] <= 0.25, full


def test_pipeline_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), safety_checker=None)
    assert loaded.unet.dtype == torch.float32
    assert loaded.tokenizer.model_max_length == 32
