"""Text front end on tiny Llama and GPT-2 models: loading, presets, pooling, generation."""

import pytest
import torch
from text_models import save_tiny_gpt2, save_tiny_llama
from transformers import Gemma2Config, Gemma2ForCausalLM

from act.collection import collect
from act.end_to_end import EndToEnd
from act.errors import ActError
from act.recording import record
from act.selection import select_modules
from act.steering import steer
from act.text.collection import (
    END_TO_END_DEFAULTS,
    collect_text,
    encode,
    fit_text,
    sentence_batches,
)
from act.text.generation import Sampling, generate, generate_tokens, perplexity, sweep
from act.text.models import load_causal_lm

SOURCE = [
    "The train to the city leaves every twenty minutes.",
    "She finished reading the novel.",
    "My phone battery runs out too quickly, which is annoying on long trips.",
    "The shop closes at six.",
]
TARGET = [
    "The waves rolled onto the sandy beach all afternoon.",
    "Whales migrate across the ocean.",
    "The sea was calm and blue as far as the eye could see from the cliffs.",
    "Dolphins leapt beside the ship.",
]
SAMPLED = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, batch_size=3)


def _lists(tokens: list[torch.Tensor]) -> list[list[int]]:
    return [row.tolist() for row in tokens]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama(llama_folder):
    return load_causal_lm(llama_folder)


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    return load_causal_lm(gpt2_folder)


def test_loader_reads_a_saved_folder_and_prepares_the_tokenizer(llama_folder, llama):
    model, tokenizer = llama
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    saved = load_causal_lm(llama_folder)[0].state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_loader_reports_missing_models_in_one_message(tmp_path):
    with pytest.raises(ActError, match=r"model folder '.*nothing-here' does not exist"):
        load_causal_lm(tmp_path / "nothing-here")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ActError, match=r"cannot load model '.*empty-folder'"):
        load_causal_lm(tmp_path / "empty-folder")
    with pytest.raises(ActError, match=r"GGUF file .* not found"):
        load_causal_lm(tmp_path / "missing.gguf")


def test_family_presets_name_the_models_own_modules(llama, gpt2):
    assert select_modules(llama[0], "attention-output") == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    assert select_modules(llama[0], "llm") == ["model.layers.1.self_attn.o_proj"]
    assert select_modules(gpt2[0], "llm") == [
        "transformer.h.0.ln_1",
        "transformer.h.0.ln_2",
        "transformer.h.1.ln_1",
        "transformer.h.1.ln_2",
        "transformer.ln_f",
    ]
    config = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    )  # fmt: skip
    assert select_modules(Gemma2ForCausalLM(config), "llm") == [
        f"model.layers.{i}.{norm}"
        for i in range(2)
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm")
    ]
    with pytest.raises(ActError, match="no layer preset for model type None"):
        select_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), "llm")


def test_encode_left_pads_and_counts_positions_over_real_tokens(llama):
    _, tokenizer = llama
    batch = encode(tokenizer, ["The sea.", "The train to the city leaves."])
    mask, positions = batch["attention_mask"], batch["position_ids"]
    short = int(mask[0].sum())
    assert mask[0, : mask.shape[1] - short].eq(0).all() and mask[0, -short:].eq(1).all()
    assert positions[0, -short:].tolist() == list(range(short))
    assert batch["input_ids"][0, 0] == tokenizer.pad_token_id
    chat = encode(tokenizer, ["hi"], chat=True)["input_ids"][0].tolist()
    assert chat[0] == tokenizer.bos_token_id and chat[-1] == tokenizer.bos_token_id


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_padding_does_not_change_pooled_samples(which, request):
    model, tokenizer = request.getfixturevalue(which)
    sites = select_modules(model, "llm")
    padded = collect(model, sites, sentence_batches(model, tokenizer, SOURCE, TARGET))
    alone = collect(model, sites, sentence_batches(model, tokenizer, SOURCE, TARGET, batch_size=1))
    for site in sites:
        torch.testing.assert_close(padded.source[site], alone.source[site], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(padded.target[site], alone.target[site], atol=1e-5, rtol=1e-4)
    # Closed form: the sample is the mean of the module output over the sentence's tokens.
    site = sites[0]
    with record(model, [site]) as recorder, torch.no_grad():
        model(**tokenizer([SOURCE[2]], return_tensors="pt"))
    module = model.get_submodule(site)
    outputs = []
    handle = module.register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        model(**tokenizer([SOURCE[2]], return_tensors="pt"))
    handle.remove()
    torch.testing.assert_close(padded.source[site][2], outputs[0][0].mean(dim=0))
    torch.testing.assert_close(recorder.samples()[site][0], outputs[0][0].mean(dim=0))


def test_fit_text_carries_fingerprint_and_info(llama):
    model, tokenizer = llama
    transport = fit_text(model, tokenizer, SOURCE, TARGET, progress=False, info={"x": 1})
    assert transport.sites == select_modules(model, "llm") and transport.method == "linear"
    assert transport.model_class == "LlamaForCausalLM" and not transport.causal
    assert transport.source_samples == 4 and transport.target_samples == 4
    assert transport.info == {
        "source_sentences": 4,
        "target_sentences": 4,
        "x": 1,
        "pooling": "mean",
    }
    assert transport.module_params["model.layers.1.self_attn.o_proj"] == {"weight": [32, 32]}
    with pytest.raises(ActError, match="at least 2 sentences"):
        fit_text(model, tokenizer, SOURCE[:1], TARGET, progress=False)


def test_per_token_fit_counts_every_real_token_and_ignores_padding(llama):
    model, tokenizer = llama
    transport = fit_text(model, tokenizer, SOURCE, TARGET, pooling="tokens", progress=False)
    alone = fit_text(
        model, tokenizer, SOURCE, TARGET, pooling="tokens", batch_size=1, progress=False
    )
    real = sum(len(tokenizer(text).input_ids) for text in SOURCE)
    assert transport.source_samples == real and transport.info["pooling"] == "tokens"
    for site in transport.sites:  # left padding adds no sample and changes none
        torch.testing.assert_close(
            transport.maps[site].omega, alone.maps[site].omega, atol=1e-4, rtol=1e-4
        )


def test_causal_collection_fits_module_after_module(llama):
    model, tokenizer = llama
    options = {"layers": "attention-output", "support": "all", "progress": False}
    samples = collect_text(model, tokenizer, SOURCE, TARGET, causal=True, **options)
    transport = samples.fit("linear", "all")
    assert transport.causal and transport.sites == select_modules(model, "attention-output")
    simultaneous = fit_text(model, tokenizer, SOURCE, TARGET, **options)
    first, second = transport.sites
    # The first module sees no earlier map; the second sees the first one's output.
    torch.testing.assert_close(transport.maps[first].omega, simultaneous.maps[first].omega)
    assert not torch.allclose(transport.maps[second].beta, simultaneous.maps[second].beta)


def test_end_to_end_fit_trains_every_layer_and_leaves_the_weights_alone(llama):
    model, tokenizer = llama
    before = {name: value.clone() for name, value in model.state_dict().items()}
    flags = [parameter.requires_grad for parameter in model.parameters()]
    steps = []
    transport = fit_text(
        model, tokenizer, SOURCE, TARGET, method="end-to-end", layers="attention-output",
        steps=6, learning_rate=0.05, sparsity=0.01, seed=1, init="linear",
        progress=lambda step, total, loss: steps.append((step, total)),
    )  # fmt: skip
    assert steps == [(step, 6) for step in range(1, 7)]
    assert transport.method == "end-to-end" and transport.support == "range"
    assert transport.sites == select_modules(model, "attention-output")
    assert transport.model_class == "LlamaForCausalLM" and transport.source_samples == 4
    settings = transport.info["end-to-end"]
    assert (settings["steps"], settings["learning_rate"], settings["seed"]) == (6, 0.05, 1)
    assert settings["loss"]["fitted"] < settings["loss"]["start"] < settings["loss"]["plain"]
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    inputs = encode(tokenizer, ["The sea was calm."])
    with torch.no_grad():
        plain = model(**inputs).logits
        with steer(model, transport, 0.0):
            assert torch.equal(model(**inputs).logits, plain)
        with steer(model, transport):
            assert not torch.allclose(model(**inputs).logits, plain)


def test_end_to_end_text_defaults_are_sparse_and_options_override_them_one_by_one(llama):
    model, tokenizer = llama
    options = dict(method="end-to-end", layers="attention-output", progress=False)
    default = fit_text(model, tokenizer, SOURCE, TARGET, steps=2, **options)
    dense = fit_text(model, tokenizer, SOURCE, TARGET, steps=2, sparsity=0.0, **options)
    given = fit_text(
        model, tokenizer, SOURCE, TARGET, end_to_end=EndToEnd(steps=2), **options
    )  # an EndToEnd passed as such is taken whole
    settings = [t.info["end-to-end"] for t in (default, dense, given)]
    assert [s["sparsity"] for s in settings] == [END_TO_END_DEFAULTS.sparsity, 0.0, 0.0]
    assert END_TO_END_DEFAULTS.sparsity > 0 and {s["steps"] for s in settings} == {2}


def test_end_to_end_options_belong_to_that_method(llama):
    model, tokenizer = llama
    with pytest.raises(ActError, match="steps: options of method 'end-to-end', not of 'mean'"):
        fit_text(model, tokenizer, SOURCE, TARGET, method="mean", steps=3, progress=False)
    with pytest.raises(ActError, match=r"use fit_text\(\.\.\., method='end-to-end'\)"):
        collect_text(model, tokenizer, SOURCE, TARGET, method="end-to-end", progress=False)
    with pytest.raises(ActError, match="causal: method 'end-to-end' trains every layer"):
        fit_text(model, tokenizer, SOURCE, TARGET, method="end-to-end", causal=True)
    with pytest.raises(ActError, match="learning_rate must be a positive number"):
        fit_text(model, tokenizer, SOURCE, TARGET, method="end-to-end", learning_rate=-1)
    with pytest.raises(ActError, match="at least 2 sentences"):
        fit_text(model, tokenizer, SOURCE[:1], TARGET, method="end-to-end", progress=False)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_strength_zero_generates_the_plain_tokens(which, request):
    model, tokenizer = request.getfixturevalue(which)
    prompts = ["The sea", "Whales migrate across", "She finished reading the novel"]
    transport = fit_text(model, tokenizer, SOURCE, TARGET, support="all", progress=False)
    plain = _lists(generate_tokens(model, tokenizer, prompts, SAMPLED))
    assert _lists(generate_tokens(model, tokenizer, prompts, SAMPLED)) == plain
    inputs = encode(tokenizer, prompts)
    with torch.no_grad():
        logits = model(**inputs).logits
    with steer(model, transport, 0.0) as steering, torch.no_grad():
        off = _lists(generate_tokens(model, tokenizer, prompts, SAMPLED))
        assert torch.equal(model(**inputs).logits, logits)
        steering.strength = 1.0
        steered = model(**inputs).logits
    assert off == plain
    assert (steered - logits).abs().max() > 1e-3


def test_sweep_matches_separate_steering_and_removes_its_hooks(llama):
    model, tokenizer = llama
    prompts = ["The sea", "Whales migrate across"]
    transport = fit_text(model, tokenizer, SOURCE, TARGET, support="all", progress=False)
    outputs = sweep(model, tokenizer, transport, prompts, [0.0, 0.5, 1.0], SAMPLED)
    assert list(outputs) == [0.0, 0.5, 1.0]
    assert outputs[0.0] == generate(model, tokenizer, prompts, SAMPLED)
    with steer(model, transport, 0.5):
        assert outputs[0.5] == generate(model, tokenizer, prompts, SAMPLED)
    assert not any(module._forward_hooks for module in model.modules())


def test_greedy_chat_generation_is_batch_independent(llama):
    model, tokenizer = llama
    prompts = ["The sea", "She finished reading the novel and then", "Hi"]
    greedy = Sampling(max_new_tokens=5, chat=True, batch_size=3)
    together = _lists(generate_tokens(model, tokenizer, prompts, greedy))
    apart = [
        _lists(generate_tokens(model, tokenizer, [p], Sampling(max_new_tokens=5, chat=True)))[0]
        for p in prompts
    ]
    assert together == apart


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_perplexity_is_exp_of_the_mean_token_loss(which, request):
    model, tokenizer = request.getfixturevalue(which)
    texts = [SOURCE[0], TARGET[2], SOURCE[3]]
    losses, count = 0.0, 0
    for text in texts:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        losses += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    expected = float(torch.tensor(losses / count).exp())
    assert perplexity(model, tokenizer, texts, batch_size=3) == pytest.approx(expected, rel=1e-4)


def test_sampling_options_are_validated():
    with pytest.raises(ActError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ActError, match="temperature"):
        Sampling(temperature=float("nan"))
    assert Sampling().generate_kwargs()["do_sample"] is False
    assert Sampling(temperature=0.7).generate_kwargs()["temperature"] == 0.7


def test_loader_reports_an_unusable_device(llama_folder):
    with pytest.raises(ActError, match="cannot move the model to device 'nowhere'"):
        load_causal_lm(llama_folder, device="nowhere")
