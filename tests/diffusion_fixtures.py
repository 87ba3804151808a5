"""Tiny offline diffusers pipelines with random weights: SD 1.x-shaped, SDXL and FLUX.

Every model is built from a config and every tokenizer in-process (nothing is downloaded).
The CLIP tokenizer is the real `CLIPTokenizer` class with a ~690-token BPE trained here on a
small corpus; its merges and ids are canonicalized because the trainer's order varies between
processes. Images are 32x32 (4x16x16 latents). Random-weight images are noise: tests compare
them, they are never results.
"""

from __future__ import annotations

import functools
import json
import re
from contextlib import contextmanager

import torch

CORPUS = (
    "a photo of a cat. a photo of a dog. a painting of a red car in the city at night. "
    "a portrait of a woman with blue eyes, oil on canvas. a man riding a horse on the beach. "
    "a bowl of fruit on a wooden table. an astronaut riding a horse on mars, highly detailed. "
    "a watercolor landscape with mountains and a lake. a cute robot, 3d render, studio lighting. "
    "happy sad angry calm bright dark old young big small green yellow white black."
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Prompts of collection tests.
SOURCE = ["a photo of a cat", "a photo of a dog", "a red car in the city"]
TARGET = ["a watercolor of a cat", "a watercolor landscape with mountains"]


def _byte_chars() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in its vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(256 - len(printable))]


@functools.cache
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    specials = r"<\|startoftext\|>|<\|endoftext\|>|"
    words = specials + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=600,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = {tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained}
    merges = sorted(merges, key=lambda m: (len(m[0] + m[1]), m[0] + m[1], m))
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in known))
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = EOS):
    """CLIP tokenizer (bos 685, eos 686). SD 1.x pads with eos, SDXL's second with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token=pad_token
    )


def t5_tokenizer():
    """A T5 (Unigram) tokenizer: <pad> 0, </s> 1, <unk> 2, characters and corpus words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"-()"]
    words = sorted(set(re.findall(r"\w+", CORPUS.lower())))
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
        **extra,
    )


def _ready(pipe):
    """Eval mode (config-built models start in train mode), no progress bars."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def sd_pipeline(seed: int = 0):
    """StableDiffusionPipeline: UNet with 33 norm modules, one CLIP text encoder, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe)


def sdxl_pipeline(seed: int = 0):
    """StableDiffusionXLPipeline: two CLIP encoders (the second pads with "!"), Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(force_upcast=False),
        text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer_2, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _ready(pipe)


def flux_pipeline(seed: int = 0):
    """FluxPipeline (dev-like, guidance embedding): 2 double and 2 single blocks, tiny T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        text_encoder=CLIPTextModel(_clip_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        vae=_vae(
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
    )
    return _ready(pipe)


def call_kwargs(pipe, seed: int = 0, **extra) -> dict:
    """Fast pipeline arguments: 32x32 latents output, 2 steps, guidance on."""
    flux = type(pipe).__name__.startswith("Flux")
    kwargs = dict(
        prompt="a photo of a cat",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=3.5 if flux else 7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **({"max_sequence_length": 32} if flux else {}),
    )
    kwargs.update(extra)
    return kwargs


def options(pipe, **extra) -> dict:
    """Pipeline arguments for collection (everything but prompt, generator, output_type)."""
    kwargs = call_kwargs(pipe, **extra)
    for name in ("prompt", "generator", "output_type"):
        kwargs.pop(name)
    return {"progress": False, **kwargs}


@contextmanager
def captured(module):
    """Outputs of every call of `module` (the first element of tuple outputs)."""
    outputs = []

    def hook(mod, args, output):
        outputs.append(output if isinstance(output, torch.Tensor) else output[0])

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline: a 2-block SD3 transformer, two CLIPs and a tiny T5."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    t5 = T5Config(
        vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tokenizer_2, projection_dim=32)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    return _ready(pipe)
