"""Real ComfyUI in-process for the node tests: setup, the pack, and tiny models.

Needs `COMFYUI_PATH` (a ComfyUI checkout) and a Python that can import it; tests skip
otherwise. Nothing is written into the checkout: ComfyUI's base directory (models/, output/,
custom_nodes/) is a temporary folder.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
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

TINY_SDXL = {
    **TINY_SD15_UNET, "use_linear_in_transformer": True, "num_classes": "sequential",
    "adm_in_channels": 32 + 6 * 256,  # the pooled CLIP state and six 256-wide size embeddings
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
}  # fmt: skip

TINY_Z_IMAGE = {  # Z-Image's modulation is 256 wide: the model must be as wide
    **TINY_LUMINA2, "dim": 256, "axes_dims": [32, 48, 48], "z_image_modulation": True,
    "time_scale": 1000.0, "rope_theta": 256.0,
}  # fmt: skip

TINY_WAN22_5B = {**TINY_WAN, "in_dim": 48, "out_dim": 48}  # 48-channel latents at /16

# kind -> (class name in comfy.supported_models, unet_config)
FAMILIES = {
    "sdxl": ("SDXL", TINY_SDXL),
    "flux_schnell": ("FluxSchnell", {**TINY_FLUX, "guidance_embed": False}),
    "z_image": ("ZImage", TINY_Z_IMAGE),
    "wan22_5b": ("WAN22_T2V", TINY_WAN22_5B),
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


def start_once(base: Path) -> None:
    """Start ComfyUI with `base` unless an earlier test module of this process did (ComfyUI
    starts once per process; that module's base folder may be gone since)."""
    comfyui_path()
    if "folder_paths" not in sys.modules:
        start_comfy(base)


@contextlib.contextmanager
def own_model_folders(base: Path, names: Sequence[str]) -> Iterator[None]:
    """While open, ComfyUI's model folders `names` (e.g. "loras", "act") are folders of
    their own under `base/models`; the registered ones are put back on exit."""
    import folder_paths

    saved = {name: folder_paths.folder_names_and_paths.get(name) for name in names}
    try:
        for name in names:
            (base / "models" / name).mkdir(parents=True, exist_ok=True)
            folder_paths.folder_names_and_paths[name] = (
                [str(base / "models" / name)],
                {".safetensors"},
            )
            folder_paths.filename_list_cache.pop(name, None)  # it would list the old folder
        yield
    finally:
        for name, value in saved.items():
            folder_paths.filename_list_cache.pop(name, None)
            if value is not None:
                folder_paths.folder_names_and_paths[name] = value


def pack_nodes() -> dict[str, type]:
    """The pack's nodes by node id, the pack loaded as ComfyUI loads it."""
    load_pack()
    extension = importlib.import_module(f"{PACK}.nodes.extension")
    return {node.define_schema().node_id: node for node in extension.NODES}


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
    (SDXL, FLUX.1 schnell, Z-Image, Wan 2.2 5B, SD3, Wan 2.1, Lumina2, Qwen-Image, Chroma,
    AuraFlow, FLUX.2, PixArt-Sigma, HunyuanDiT, Stable Cascade stage C, HunyuanImage 2.1,
    HiDream), float32, CPU."""
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


# The text encoders of DiT families, shrunk. ComfyUI reads `<name>_model_config` from the
# model options into a text model's config and `<name>_class` for the class of an
# SD1ClipModel-style wrapper's encoder, so the wrappers and tokenizers stay ComfyUI's own.
# LLM configs keep their dataclass' `head_dim` (a class attribute, not a field).
TINY_LLM = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1,
}  # fmt: skip

TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2}

TINY_CLIP_L = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "num_hidden_layers": 2, "projection_dim": 32,
}  # fmt: skip

# kind -> (tokenizer embedding key of its padded encoder, its final norm's site)
TEXT_ENCODERS = {
    "qwen_image": ("qwen25_7b", "clip.qwen25_7b.transformer.model.norm"),
    "hunyuan_image": ("qwen25_7b", "clip.qwen25_7b.transformer.model.norm"),
    "z_image": ("qwen3_4b", "clip.qwen3_4b.transformer.model.norm"),
    "flux2_klein": ("qwen3_4b", "clip.qwen3_4b.transformer.model.norm"),
    "lumina2": ("gemma2_2b", "clip.gemma2_2b.transformer.model.norm"),
    "flux": ("t5xxl", "clip.t5xxl.transformer.encoder.final_layer_norm"),
}


def tiny_qwen25_vl_models() -> tuple[type, type]:
    """Qwen-Image's and HunyuanImage's Qwen2.5-VL wrappers around a tiny `Qwen25_7BVLI`.

    ComfyUI's `Qwen25_7BVLI` builds a fixed 32-layer, 1280-wide vision tower (`visual`): the
    tiny one builds the same `Qwen2VLVisionTransformer` with 2 layers of width 32.
    """
    import comfy.text_encoders.hunyuan_image
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.qwen_vl
    import torch
    from comfy import sd1_clip

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = comfy.text_encoders.qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=32, output_hidden_size=config.hidden_size, intermediate_size=64,
                num_heads=2, num_layers=2, device=device, dtype=dtype, ops=operations,
            )  # fmt: skip
            self.dtype = dtype

    def tiny(wrapper: type, layer: str, layer_idx: int | None) -> type:
        """`wrapper` initialized as ComfyUI initializes it, but building `TinyQwen25VL`."""

        class Tiny(wrapper):
            def __init__(self, device="cpu", dtype=None, attention_mask=True, model_options={}):  # noqa: B006
                sd1_clip.SDClipModel.__init__(
                    self, device=device, layer=layer, layer_idx=layer_idx,
                    textmodel_json_config={}, dtype=dtype, special_tokens={"pad": 151643},
                    layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                    enable_attention_masks=attention_mask,
                    return_attention_masks=attention_mask, model_options=model_options,
                )  # fmt: skip

        return Tiny

    # the layers ComfyUI's wrappers read: the last (Qwen-Image), the third from last (Hunyuan)
    return (
        tiny(comfy.text_encoders.qwen_image.Qwen25_7BVLIModel, "last", None),
        tiny(comfy.text_encoders.hunyuan_image.Qwen25_7BVLIModel, "hidden", -3),
    )


def tiny_spiece_model() -> bytes:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3):
    Gemma2's tokenizer comes with the checkpoint, not with ComfyUI."""
    import io

    import sentencepiece

    words = "a photo watercolor painting of the cat dog house tree car boat red blue sky"
    corpus = [f"{first} {second}" for first in words.split() for second in words.split()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=64, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, num_threads=1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def text_encoder_target(kind: str) -> tuple[type, type, dict, dict]:
    """ComfyUI's tokenizer and text encoder classes of a family of `TEXT_ENCODERS`, and the
    model options and tokenizer data that shrink the encoder."""
    import comfy.text_encoders.flux as flux
    import comfy.text_encoders.hunyuan_image
    import comfy.text_encoders.lumina2
    import comfy.text_encoders.qwen_image
    import comfy.text_encoders.z_image

    if kind in ("qwen_image", "hunyuan_image"):
        qwen_image, hunyuan_image = tiny_qwen25_vl_models()
        if kind == "qwen_image":
            options = {"qwen25_7b_class": qwen_image, "qwen25_7b_model_config": TINY_LLM}
            return (
                comfy.text_encoders.qwen_image.QwenImageTokenizer,
                comfy.text_encoders.qwen_image.te(),
                options,
                {},
            )
        # layer -3 needs 4 layers; ByT5 (for quoted text) is left out, as te(byt5=False) does
        config = {**TINY_LLM, "num_hidden_layers": 4}
        options = {"qwen25_7b_class": hunyuan_image, "qwen25_7b_model_config": config}
        return (
            comfy.text_encoders.hunyuan_image.HunyuanImageTokenizer,
            comfy.text_encoders.hunyuan_image.te(byt5=False),
            options,
            {},
        )
    if kind == "z_image":
        # Qwen3 with attention q/k norms; layer -2 needs 3 layers; no padding (min length 1)
        options = {"qwen3_4b_model_config": {**TINY_LLM, "num_hidden_layers": 3}}
        return (
            comfy.text_encoders.z_image.ZImageTokenizer,
            comfy.text_encoders.z_image.te(),
            options,
            {},
        )
    if kind == "flux2_klein":
        # Qwen3 padded to 512 tokens with no end token; ComfyUI stacks the outputs of three
        # inner layers (9, 18 and 27 of 36): the tiny one those of layers 1, 2 and 3 of 4
        class TinyKleinQwen3(flux.Qwen3_4BModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
                super().__init__(
                    device=device, layer=[1, 2, 3], dtype=dtype, model_options=model_options
                )

        options = {
            "qwen3_4b_class": TinyKleinQwen3,
            "qwen3_4b_model_config": {**TINY_LLM, "num_hidden_layers": 4},
        }
        return flux.KleinTokenizer, flux.klein_te(), options, {}
    if kind == "lumina2":
        # Gemma2: four norms a layer, a start token, no end token; layer -2 needs 3 layers
        options = {"gemma2_2b_model_config": {**TINY_LLM, "num_hidden_layers": 3}}
        return (
            comfy.text_encoders.lumina2.LuminaTokenizer,
            comfy.text_encoders.lumina2.te(),
            options,
            {"spiece_model": tiny_spiece_model()},
        )
    if kind == "flux":
        # CLIP-L (padded to 77 with its end token) and T5-XXL (end token, padded to 256)
        options = {"clip_l_model_config": TINY_CLIP_L, "t5xxl_model_config": TINY_T5}
        return flux.FluxTokenizer, flux.flux_clip(), options, {}
    raise ValueError(f"unknown text encoder {kind!r}")


def tiny_text_encoder(kind: str, seed: int = 0, min_length: int | None = None):
    """A CLIP with the tiny text encoder of a family of `TEXT_ENCODERS`, built as ComfyUI
    builds it; `min_length` pads its main tokenizer to that many tokens."""
    import comfy.sd
    import comfy.supported_models_base

    tokenizer, model, options, data = text_encoder_target(kind)
    if min_length is not None:
        data = {**data, f"{TEXT_ENCODERS[kind][0]}_min_length": min_length}
    target = comfy.supported_models_base.ClipTarget(tokenizer, model)
    clip = comfy.sd.CLIP(target=target, model_options=options, tokenizer_data=data)
    init_weights(clip.cond_stage_model, seed)
    return clip
