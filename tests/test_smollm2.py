"""The built-in SmolLM2-135M-Instruct, for real (the first run de-quantises it: ~30 s)."""

import pytest
import torch

from act.selection import norm_sites, select_modules
from act.steering import steer
from act.text import encode, fit_text
from act.text.data import lines
from act.text.generation import Sampling, generate_tokens
from act.text.goals import goal
from act.text.models import load_causal_lm

PROMPTS = ["Get lost, you miserable", "The best thing about living by the sea is"]


@pytest.fixture(scope="session")
def smollm2():
    return load_causal_lm("smollm2")


def test_smollm2_modules_and_presets(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(norm_sites(model)) == 61 and "model.norm" in norm_sites(model)
    every = [f"model.layers.{i}.self_attn.o_proj" for i in range(30)]
    assert select_modules(model, "attention-output") == every
    assert select_modules(model, "llm") == every[15:]
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_smollm2_detox_transport_at_strength_zero_equals_plain(smollm2):
    model, tokenizer = smollm2
    transport = fit_text(
        model, tokenizer, lines("toxic")[:16], lines("nontoxic")[:16], progress=False
    )
    assert transport.source_samples == 16 and len(transport.sites) == 15
    assert 0.5 < transport.moved_fraction() <= 1.0
    sampling = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    plain = [row.tolist() for row in generate_tokens(model, tokenizer, PROMPTS, sampling)]
    inputs = encode(tokenizer, PROMPTS)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
    with steer(model, transport, 0.0) as steering:
        off = [row.tolist() for row in generate_tokens(model, tokenizer, PROMPTS, sampling)]
        steering.strength = 1.0
        with torch.no_grad():
            steered = model(**inputs).logits[:, -1]
    assert off == plain and all(len(row) > 0 for row in plain)
    assert (steered - logits).abs().max() > 0.1


def test_smollm2_detox_goal_fits_mean_act_on_mean_pooled_samples(smollm2):
    """The measured detox default (see `act.text.goals`): a shift per unit, one sample per
    sentence, inside the source's range, on the preset's 15 attention outputs."""
    model, tokenizer = smollm2
    options = goal("detox").options()
    assert options == {"method": "mean", "support": "range", "layers": "llm", "pooling": "mean"}
    source, target = lines("toxic")[:16], lines("nontoxic")[:16]
    transport = fit_text(model, tokenizer, source, target, **options, progress=False)
    assert (transport.method, transport.support, transport.info["pooling"]) == (
        "mean",
        "range",
        "mean",
    )
    assert transport.source_samples == 16 and len(transport.sites) == 15
    for site_map in transport.maps.values():
        assert torch.all(site_map.omega == 1)  # Mean-AcT: a shift only
