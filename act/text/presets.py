"""Where to hook causal LMs: layer presets per architecture family, registered in
`act.PRESETS`.

Llama-like models (Llama, SmolLM2, Qwen2, Mistral): the attention outputs
`model.layers.N.self_attn.o_proj` of the second half of the layers (`attention-output-late`;
measured on SmolLM2 against every layer's attention output, the norms and the MLP outputs, see
the README), or of every layer (`attention-output`, the paper's choice for Llama-3-8B);
Gemma-2 the post-attention and post-feed-forward norms (the paper's choice); GPT-2 the `ln_*`
norms. `block-outputs` is the residual stream (every decoder layer's output but the first), what
a llama.cpp control vector steers. The preset `llm` picks by `config.model_type`.
"""

from __future__ import annotations

from torch import nn

from ..errors import ActError
from ..selection import PRESETS, preset_names, register_preset, select_modules

ATTENTION_OUTPUT = [r"model\.layers\.\d+\.self_attn\.o_proj"]
BLOCK_OUTPUTS = [r"model\.layers\.\d+"]
GEMMA2_POST_NORMS = [r"model\.layers\.\d+\.(post_attention_layernorm|post_feedforward_layernorm)"]
GPT2_NORMS = [r"transformer\.h\.\d+\.ln_(1|2)", r"transformer\.ln_f"]

# config.model_type -> preset name, for the automatic preset "llm".
FAMILIES = {
    "llama": "attention-output-late",
    "mistral": "attention-output-late",
    "qwen2": "attention-output-late",
    "qwen3": "attention-output-late",
    "gemma2": "gemma2-post-norms",
    "gemma3_text": "gemma2-post-norms",
    "gpt2": "gpt2-ln",
}


def family_sites(model: nn.Module) -> list[str]:
    """The sites of the preset for the model's family (`config.model_type`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    preset = FAMILIES.get(model_type)
    if preset is None:
        raise ActError(
            f"no layer preset for model type {model_type!r}; pass a preset "
            f"({', '.join(preset_names('text'))}) or a regular expression such as "
            r"'model\.layers\.\d+\.self_attn\.o_proj'"
        )
    return PRESETS[preset].find(model)


def late_attention_outputs(model: nn.Module) -> list[str]:
    """The attention outputs (`o_proj`) of the second half of the layers."""
    sites = PRESETS["attention-output"].find(model)
    return sites[len(sites) // 2 :]


def later_block_outputs(model: nn.Module) -> list[str]:
    """The outputs of every decoder layer `model.layers.N` but the first."""
    return select_modules(model, BLOCK_OUTPUTS)[1:]


register_preset(
    "attention-output",
    "Llama-like LMs (Llama, SmolLM2, Qwen2, Mistral): every layer's attention output o_proj",
    ATTENTION_OUTPUT,
    family="text",
)
register_preset(
    "attention-output-late",
    "Llama-like LMs: the attention outputs o_proj of the second half of the layers",
    late_attention_outputs,
    family="text",
)
register_preset(
    "block-outputs",
    "Llama-like LMs: the output of every decoder layer but the first (the residual stream; "
    "what a llama.cpp control vector steers)",
    later_block_outputs,
    family="text",
)
register_preset(
    "gemma2-post-norms",
    "Gemma-2: the post-attention and post-feed-forward norms of every block",
    GEMMA2_POST_NORMS,
    family="text",
)
register_preset("gpt2-ln", "GPT-2: the ln_1, ln_2 and ln_f LayerNorms", GPT2_NORMS, family="text")
register_preset(
    "llm",
    "the preset for the causal LM's family (config.model_type)",
    family_sites,
    family="text",
)
