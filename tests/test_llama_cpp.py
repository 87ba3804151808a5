"""llama.cpp runs our GGUF exports as we steer: greedy decoding of SmolLM2 by llama.cpp's
`llama-completion` gives the same text, token for token, as `act.steer` in transformers.

Needs a llama.cpp build: set `LLAMA_CPP_BIN` to the folder holding `llama-completion` (the
README says how to build it); skipped otherwise. It takes a few minutes on two CPU cores.

llama.cpp computes in float32 here (f32 tensors, f32 KV cache, no flash attention), as the
transformers model does. A checkpoint that keeps the source's Q4_1 tensors is computed with
quantized activations, so it is only checked to load and to steer.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from act import steer
from act.text import fit_text, load_causal_lm
from act.text.data import lines
from act.text.gguf_export import export_control_vector, export_gguf
from act.text.models import smollm2_gguf

BIN = os.environ.get("LLAMA_CPP_BIN")
pytestmark = pytest.mark.skipif(not BIN, reason="set LLAMA_CPP_BIN to a llama.cpp build's bin")
PROMPTS = ["My favourite thing to do on a weekend is", "The old lighthouse keeper said that"]
TOKENS = 32
# llama-completion ends what it prints with a blank line
TRAILER = "\n\n"


@pytest.fixture(scope="module")
def fitted():
    model, tokenizer = load_causal_lm("smollm2")
    source, target = lines("generic")[:8], lines("ocean")[:8]
    linear = fit_text(model, tokenizer, source, target, support="all", progress=False)
    mean = fit_text(
        model,
        tokenizer,
        source,
        target,
        layers="block-outputs",
        method="mean",
        support="all",
        progress=False,
    )
    return model, tokenizer, linear, mean


def _llama_cpp(model: Path, prompt: str, *options: str) -> str:
    command = [
        str(Path(BIN) / "llama-completion"),
        *("-m", str(model), "-p", prompt, "-n", str(TOKENS), "-no-cnv", "--ignore-eos"),
        *("--temp", "0", "--top-k", "1", "-s", "0", "-t", str(os.cpu_count() or 1)),
        *("-fa", "off", "-ctk", "f32", "-ctv", "f32"),
        *("--no-display-prompt", "--simple-io", "--no-warmup", *options),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.endswith(TRAILER), run.stdout
    return run.stdout.removesuffix(TRAILER)


def _ours(model, tokenizer, prompt: str, transport, strength: float) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad(), steer(model, transport, strength):
        out = model.generate(
            ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, top_k=None
        )
    return tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_llama_cpp_runs_the_folded_checkpoint_as_we_steer(fitted, tmp_path, strength):
    model, tokenizer, linear, _ = fitted
    path = tmp_path / "steered.gguf"
    export_gguf(model, linear, smollm2_gguf(), path, strength, tensor_type="f32")
    for prompt in PROMPTS:
        ours = _ours(model, tokenizer, prompt, linear, strength)
        assert ours != _ours(model, tokenizer, prompt, linear, 0.0)  # the transport steers
        assert _llama_cpp(path, prompt) == ours


def test_llama_cpp_runs_a_quantized_checkpoint_with_folded_tensors_steered(fitted, tmp_path):
    """Q4_1 tensors kept, folded ones float32: llama.cpp multiplies Q4_1 weights with
    quantized activations, so its text drifts from the float model's after a while; it must
    load and be steered."""
    model, _, linear, _ = fitted
    path = tmp_path / "steered-q4_1.gguf"
    export_gguf(model, linear, smollm2_gguf(), path, 1.0)
    for prompt in PROMPTS:
        assert _llama_cpp(path, prompt) != _llama_cpp(smollm2_gguf(), prompt)


def test_llama_cpp_steers_with_the_control_vector_as_we_do(fitted, tmp_path):
    model, tokenizer, linear, mean = fitted
    plain = tmp_path / "plain.gguf"
    export_gguf(model, linear, smollm2_gguf(), plain, 0.0, tensor_type="f32")
    vector = tmp_path / "ocean.gguf"
    export_control_vector(model, mean, vector, 0.1)
    for prompt in PROMPTS:
        assert _llama_cpp(plain, prompt) == _ours(model, tokenizer, prompt, mean, 0.0)
        ours = _ours(model, tokenizer, prompt, mean, 0.05)
        assert ours != _ours(model, tokenizer, prompt, mean, 0.0)
        assert _llama_cpp(plain, prompt, "--control-vector-scaled", f"{vector}:0.5") == ours
