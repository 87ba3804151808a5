"""Tiny causal LMs for the text tests: random weights, tokenizers trained in-process.

Each builder saves the model and tokenizer with `save_pretrained` into a folder, so tests go
through the real loader (`act.text.models.load_causal_lm`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from act.text.data import lines

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>{% endif %}"
)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary 300) trained on the shipped sentences."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = lines("generic") + lines("ocean") + lines("toxic") + lines("nontoxic")
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def save_tiny_llama(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads) saved with its tokenizer."""
    tokenizer = train_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (width 32, absolute positions) saved with its tokenizer."""
    tokenizer = train_tokenizer()
    ids = _ids(tokenizer)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids, n_inner=64, resid_pdrop=0.0
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
