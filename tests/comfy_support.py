"""Real ComfyUI in-process for the node tests: setup, the pack, and tiny models.

Needs `COMFYUI_PATH` (a ComfyUI checkout) and a Python that can import it; tests skip
otherwise. Nothing is written into the checkout: ComfyUI's base directory (models/, output/,
custom_nodes/) is a temporary folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_act_pack"

TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1, 1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 32,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip

TINY_CLIP = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 32,
    "torch_dtype": "float32", "vocab_size": 49408,
}  # fmt: skip

TINY_FLUX = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
    "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": [],
}  # fmt: skip

TINY_SD3 = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 32,
    "context_embedder_config": {
        "target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}
    },
    "pos_embed_max_size": 64, "pos_embed_scaling_factor": None,
}  # fmt: skip

TINY_WAN = {
    "image_model": "wan2.1", "model_type": "t2v", "in_dim": 16, "out_dim": 16, "dim": 64,
    "ffn_dim": 128, "freq_dim": 32, "text_dim": 32, "num_heads": 2, "num_layers": 2,
    "text_len": 77,
}  # fmt: skip

TINY_LUMINA2 = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2,
    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "multiple_of": 16,
    "ffn_dim_multiplier": 2.0, "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [8, 12, 12],
    "axes_lens": [300, 64, 64],
}  # fmt: skip

TINY_QWEN_IMAGE = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
    "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
    "joint_attention_dim": 32, "axes_dims_rope": [8, 12, 12],
}  # fmt: skip

TINY_CHROMA = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32,
    "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "patch_size": 2, "in_dim": 64,
    "out_dim": 64, "hidden_dim": 64, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": 32,
}  # fmt: skip

TINY_AURAFLOW = {
    "cond_seq_dim": 32, "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64,
    "n_layers": 3, "n_double_layers": 1, "n_heads": 2, "global_conddim": 64, "max_seq": 1024,
}  # fmt: skip

TINY_FLUX2 = {
    "image_model": "flux2", "guidance_embed": True, "in_channels": 128, "out_channels": 128,
    "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8],
    "theta": 2000, "patch_size": 1, "qkv_bias": False, "txt_ids_dims": [3],
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
}  # fmt: skip

# PixArt's pos-embed divides by its base size, round((H + W) / 2 / 64) * 64 latent pixels:
# it needs latents of more than 32 x 32 (256 px)
TINY_PIXART_SIGMA = {
    "image_model": "pixart_sigma", "patch_size": 2, "in_channels": 4, "hidden_size": 64,
    "depth": 2, "num_heads": 2, "caption_channels": 32, "model_max_length": 77,
    "micro_condition": False,
}  # fmt: skip

TINY_HUNYUAN_DIT = {
    "image_model": "hydit", "input_size": [8, 8], "patch_size": 2, "in_channels": 4,
    "hidden_size": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "text_states_dim": 32,
    "text_states_dim_t5": 32, "text_len": 77, "text_len_t5": 8,
}  # fmt: skip

TINY_CASCADE_C = {
    "stable_cascade_stage": "c", "c_in": 16, "c_out": 16, "c_r": 64, "c_cond": 32,
    "c_hidden": [32, 32], "nhead": [2, 2], "blocks": [[1, 1], [1, 1]],
    "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"], "c_clip_text": 32,
    "c_clip_text_pooled": 32, "c_clip_img": 768, "c_clip_seq": 4,
}  # fmt: skip

TINY_HUNYUAN_IMAGE = {
    "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
    "vec_in_dim": None, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0,
    "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [16, 16], "theta": 256,
    "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
    "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False,
}  # fmt: skip

TINY_HIDREAM = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 32,
    "num_attention_heads": 2, "caption_channels": [32, 32], "text_emb_dim": 32,
    "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": [8, 12, 12],
    "max_resolution": [32, 32], "llama_layers": [0, 1, 2],
}  # fmt: skip

# kind -> (class name in comfy.supported_models, unet_config)
FAMILIES = {
    "sd3": ("SD3", TINY_SD3),
    "wan": ("WAN21_T2V", TINY_WAN),
    "lumina2": ("Lumina2", TINY_LUMINA2),
    "qwen_image": ("QwenImage", TINY_QWEN_IMAGE),
    "chroma": ("Chroma", TINY_CHROMA),
    "auraflow": ("AuraFlow", TINY_AURAFLOW),
    "flux2": ("Flux2", TINY_FLUX2),
    "pixart_sigma": ("PixArtSigma", TINY_PIXART_SIGMA),
    "hydit": ("HunyuanDiT", TINY_HUNYUAN_DIT),
    "cascade_c": ("Stable_Cascade_C", TINY_CASCADE_C),
    "hunyuan_image": ("HunyuanImage21", TINY_HUNYUAN_IMAGE),
    "hidream": ("HiDream", TINY_HIDREAM),
}


def hydit_conditioning(cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """HunyuanDiT's second text stream: 8 tokens of the CLIP's states stand in for mT5's."""
    import torch

    batch, length = cond.shape[:2]
    return {
        "attention_mask": torch.ones(batch, length),
        "conditioning_mt5xl": cond[:, :8],
        "attention_mask_mt5xl": torch.ones(batch, 8),
    }


def hidream_conditioning(cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """HiDream's Llama hidden states, (batch, layers, tokens, width): three 8-token windows of
    the CLIP's states stand in for the three layers `TINY_HIDREAM` reads."""
    import torch

    return {"conditioning_llama3": torch.stack([cond[:, i : i + 8] for i in range(3)], dim=1)}


# kind -> (pixels to collect at, latent sides to sample at), where 64 px and (8, 16) fail
SIZES = {"pixart_sigma": (320, (40, 48))}

# kind -> what its text encoder adds to the conditioning, from the CLIP's token states
TextExtras = Callable[["torch.Tensor"], dict[str, "torch.Tensor"]]
TEXT_EXTRAS: dict[str, TextExtras] = {"hydit": hydit_conditioning, "hidream": hidream_conditioning}


def comfyui_path() -> Path:
    """The checkout named by COMFYUI_PATH, or skip the calling test."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy").is_dir():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tests")
    return Path(path)


def start_comfy(base: Path) -> None:
    """Import ComfyUI in-process on the CPU with `base` as its base directory."""
    path = str(comfyui_path())
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)  # before the repository: ComfyUI's `nodes` module must win
    try:
        import comfy.cli_args
    except ImportError as error:
        pytest.skip(f"ComfyUI cannot be imported with this Python: {error}")
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.base_directory = str(base)
    comfy.cli_args.args.disable_api_nodes = True
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    import comfy.model_management  # device selection reads the args
    import folder_paths

    assert Path(folder_paths.base_path).resolve() == base.resolve()


def load_pack() -> ModuleType:
    """Import the repository as ComfyUI does: a package loaded from its folder."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(
        PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def init_weights(module, seed: int = 0) -> None:
    """ComfyUI builds layers with empty weights: fill them deterministically."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                values = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(values / math.sqrt(parameter[0].numel()))
            elif name.endswith("weight"):
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            else:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def tiny_model(kind: str = "sd15", seed: int = 0):
    """A MODEL (ModelPatcher) with a tiny SD1.5-config UNet, FLUX, or a model of `FAMILIES`
    (SD3, Wan 2.1, Lumina2, Qwen-Image, Chroma, AuraFlow, FLUX.2, PixArt-Sigma, HunyuanDiT,
    Stable Cascade stage C, HunyuanImage 2.1, HiDream), float32, CPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    if kind == "sd15":
        config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
    elif kind in FAMILIES:
        name, unet_config = FAMILIES[kind]
        config = getattr(comfy.supported_models, name)(dict(unet_config))
    else:
        config = comfy.supported_models.Flux(dict(TINY_FLUX))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "")
    init_weights(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def tiny_clip(
    seed: int = 0,
    hidden: int = 32,
    extras: TextExtras | None = None,
):
    """A CLIP with a 2-layer CLIP-L of width `hidden` and ComfyUI's SD1 tokenizer; `extras`
    (of `TEXT_EXTRAS`) adds a family's further text conditioning, as its text encoder does."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    config = {**TINY_CLIP, "hidden_size": hidden, "projection_dim": hidden}

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(
                device=device,
                dtype=dtype,
                model_options=model_options or {},
                textmodel_json_config=dict(config),
                return_projected_pooled=False,
            )

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            super().__init__(
                device=device,
                dtype=dtype,
                model_options=model_options or {},
                clip_model=TinyClipL,
                **kwargs,
            )

        def encode_token_weights(self, token_weight_pairs):
            cond, pooled, *rest = super().encode_token_weights(token_weight_pairs)
            if extras is None:
                return (cond, pooled, *rest)
            return cond, pooled, {**(rest[0] if rest else {}), **extras(cond)}

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)
    clip = comfy.sd.CLIP(target=target)
    init_weights(clip.cond_stage_model, seed)
    return clip


def encode(clip, text: str, **extra) -> list:
    """CLIPTextEncode, with `extra` added to the conditioning."""
    output = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    cond = output.pop("cond")
    return [[cond, {**output, **extra}]]


def sample(model, positive, negative, seed: int = 0, steps: int = 3, cfg: float = 5.0, size=16):
    """KSampler on an empty latent: the denoised latent."""
    import comfy.sample
    import torch

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, size, size]))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
        denoise=1.0, disable_pbar=True, seed=seed,
    )  # fmt: skip


def temporary_base() -> Path:
    return Path(tempfile.mkdtemp(prefix="act-comfyui-"))
