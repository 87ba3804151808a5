"""An SD1.5-shaped checkpoint with random weights, generated for tests (never downloaded).

ComfyUI's stock `CheckpointLoaderSimple` detects SD1.5 from the UNet's key names and two
widths (`model_channels` 320, `context_dim` 768), so a UNet with 2 of SD1.5's 4 levels loads
as SD1.5. The CLIP-L text encoder must be full size (ComfyUI builds it from a fixed config).
The VAE is a TAESD (ComfyUI detects it by `taesd_decoder.1.weight`): 2.4 M parameters
instead of the 84 M of SD's KL autoencoder, and the same 8x downscale and 4 latent channels.
Keys carry the original SD checkpoint prefixes; weights are float16, seeded, finite.

Pure torch + safetensors: ComfyUI is not imported, so this runs in any test process.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."

MODEL_CHANNELS = 320  # pinned by ComfyUI's SD15 detection
CONTEXT_DIM = 768  # pinned by ComfyUI's SD15 detection (CLIP-L width)
LATENT_CHANNELS = 4
TAESD_WIDTH = 64
TAESD_SCALE = 0.18215  # what ComfyUI's VAELoader sets for SD1.x's TAESD

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class CheckpointInfo:
    """What `write_sd15_checkpoint` wrote: where, how many parameters and bytes, how long."""

    path: Path
    parameters: int
    bytes: int
    seconds: float


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> Shapes:
    shapes = {f"{name}.weight": (out_features, in_features)}
    return {**shapes, f"{name}.bias": (out_features,)} if bias else shapes


def _conv(name: str, out_ch: int, in_ch: int, kernel: int = 3, bias: bool = True) -> Shapes:
    shapes = {f"{name}.weight": (out_ch, in_ch, kernel, kernel)}
    return {**shapes, f"{name}.bias": (out_ch,)} if bias else shapes


def _norm(name: str, width: int) -> Shapes:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def _resblock(name: str, in_ch: int, out_ch: int) -> Shapes:
    """openaimodel.ResBlock: GroupNorm, SiLU, conv; timestep embedding; 1x1 skip if needed."""
    shapes = {
        **_norm(f"{name}.in_layers.0", in_ch),
        **_conv(f"{name}.in_layers.2", out_ch, in_ch),
        **_linear(f"{name}.emb_layers.1", out_ch, 4 * MODEL_CHANNELS),
        **_norm(f"{name}.out_layers.0", out_ch),
        **_conv(f"{name}.out_layers.3", out_ch, out_ch),
    }
    if in_ch != out_ch:
        shapes.update(_conv(f"{name}.skip_connection", out_ch, in_ch, kernel=1))
    return shapes


def _attention(name: str, width: int, context: int) -> Shapes:
    return {
        **_linear(f"{name}.to_q", width, width, bias=False),
        **_linear(f"{name}.to_k", width, context, bias=False),
        **_linear(f"{name}.to_v", width, context, bias=False),
        **_linear(f"{name}.to_out.0", width, width),
    }


def _spatial_transformer(name: str, width: int) -> Shapes:
    """SD1.x SpatialTransformer: depth 1, 1x1-conv projections, GEGLU feed-forward."""
    block = f"{name}.transformer_blocks.0"
    return {
        **_norm(f"{name}.norm", width),
        **_conv(f"{name}.proj_in", width, width, kernel=1),
        **_attention(f"{block}.attn1", width, width),
        **_linear(f"{block}.ff.net.0.proj", 8 * width, width),
        **_linear(f"{block}.ff.net.2", width, 4 * width),
        **_attention(f"{block}.attn2", width, CONTEXT_DIM),
        **_norm(f"{block}.norm1", width),
        **_norm(f"{block}.norm2", width),
        **_norm(f"{block}.norm3", width),
        **_conv(f"{name}.proj_out", width, width, kernel=1),
    }


def unet_shapes(channel_mult: tuple[int, ...] = (1, 1), num_res_blocks: int = 1) -> Shapes:
    """SD1.5's UNet (ComfyUI/LDM names) with fewer levels; every level has cross-attention."""
    shapes = {
        **_linear("time_embed.0", 4 * MODEL_CHANNELS, MODEL_CHANNELS),
        **_linear("time_embed.2", 4 * MODEL_CHANNELS, 4 * MODEL_CHANNELS),
        **_conv("input_blocks.0.0", MODEL_CHANNELS, LATENT_CHANNELS),
    }
    skips = [MODEL_CHANNELS]  # widths of the outputs the decoder concatenates
    width, block = MODEL_CHANNELS, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            shapes.update(_resblock(f"input_blocks.{block}.0", width, MODEL_CHANNELS * mult))
            width = MODEL_CHANNELS * mult
            shapes.update(_spatial_transformer(f"input_blocks.{block}.1", width))
            skips.append(width)
            block += 1
        if level < len(channel_mult) - 1:
            shapes.update(_conv(f"input_blocks.{block}.0.op", width, width))
            skips.append(width)
            block += 1
    shapes.update(_resblock("middle_block.0", width, width))
    shapes.update(_spatial_transformer("middle_block.1", width))
    shapes.update(_resblock("middle_block.2", width, width))
    block = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for index in range(num_res_blocks + 1):
            out = MODEL_CHANNELS * mult
            shapes.update(_resblock(f"output_blocks.{block}.0", width + skips.pop(), out))
            width = out
            shapes.update(_spatial_transformer(f"output_blocks.{block}.1", width))
            if level > 0 and index == num_res_blocks:
                shapes.update(_conv(f"output_blocks.{block}.2.conv", width, width))
            block += 1
    shapes.update(_norm("out.0", width))
    shapes.update(_conv("out.2", LATENT_CHANNELS, width))
    return shapes


def clip_l_shapes(layers: int = 12, width: int = CONTEXT_DIM, vocabulary: int = 49408) -> Shapes:
    """CLIP ViT-L/14's text model (transformers' names, as in SD1.5 checkpoints)."""
    shapes = {
        "embeddings.token_embedding.weight": (vocabulary, width),
        "embeddings.position_embedding.weight": (77, width),
    }
    for layer in range(layers):
        name = f"encoder.layers.{layer}"
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update(_linear(f"{name}.self_attn.{projection}", width, width))
        shapes.update(_norm(f"{name}.layer_norm1", width))
        shapes.update(_linear(f"{name}.mlp.fc1", 4 * width, width))
        shapes.update(_linear(f"{name}.mlp.fc2", width, 4 * width))
        shapes.update(_norm(f"{name}.layer_norm2", width))
    shapes.update(_norm("final_layer_norm", width))
    return shapes


def _taesd_block(name: str) -> Shapes:
    convs = [_conv(f"{name}.conv.{index}", TAESD_WIDTH, TAESD_WIDTH) for index in (0, 2, 4)]
    return {key: shape for conv in convs for key, shape in conv.items()}


def taesd_shapes() -> Shapes:
    """ComfyUI's TAESD (comfy/taesd/taesd.py): Sequential indices of the encoder and decoder."""
    width = TAESD_WIDTH
    encoder: Shapes = {**_conv("0", width, 3), **_conv("14", LATENT_CHANNELS, width)}
    for index in (2, 6, 10):  # strided downsampling convs
        encoder.update(_conv(str(index), width, width, bias=False))
    for index in (1, 3, 4, 5, 7, 8, 9, 11, 12, 13):
        encoder.update(_taesd_block(str(index)))
    decoder: Shapes = {**_conv("1", width, LATENT_CHANNELS), **_conv("19", 3, width)}
    for index in (7, 12, 17):  # convs after each 2x upsampling
        decoder.update(_conv(str(index), width, width, bias=False))
    for index in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
        decoder.update(_taesd_block(str(index)))
    return {
        **{f"taesd_encoder.{key}": shape for key, shape in encoder.items()},
        **{f"taesd_decoder.{key}": shape for key, shape in decoder.items()},
        "vae_scale": (),
        "vae_shift": (),
    }


def sd15_shapes() -> Shapes:
    """Every tensor of the checkpoint, with the original SD1.x key prefixes."""
    parts = ((UNET_PREFIX, unet_shapes()), (CLIP_PREFIX, clip_l_shapes()))
    shapes = {prefix + key: shape for prefix, part in parts for key, shape in part.items()}
    shapes.update({VAE_PREFIX + key: shape for key, shape in taesd_shapes().items()})
    return shapes


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float16 tensor that keeps activations at unit scale.

    Matrices and kernels ~ N(0, 1/fan_in); norm scales ~ 1 + N(0, 0.1²); biases ~ N(0, 0.02²);
    TAESD's latent scale and shift are SD1.x's (0.18215, 0).
    """
    if name.endswith("vae_scale"):
        return torch.tensor(TAESD_SCALE, dtype=torch.float16)
    if name.endswith("vae_shift"):
        return torch.tensor(0.0, dtype=torch.float16)
    values = torch.randn(shape, generator=generator, dtype=torch.float16)
    if len(shape) >= 2:
        return values.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".weight"):
        return values.mul_(0.1).add_(1.0)
    return values.mul_(0.02)


def write_sd15_checkpoint(path: str | Path, seed: int = 0) -> CheckpointInfo:
    """Write an SD1.5-shaped checkpoint with random float16 weights to `path` (safetensors).

    Returns:
        The path, the number of parameters (≈ 170 M: UNet 44 M, CLIP-L 123 M, TAESD 2.4 M),
        the file size (≈ 340 MB) and the seconds it took.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: random_weight(name, shape, generator) for name, shape in sd15_shapes().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return CheckpointInfo(
        path=path,
        parameters=sum(tensor.numel() for tensor in tensors.values()),
        bytes=path.stat().st_size,
        seconds=time.perf_counter() - start,
    )


def cached_sd15_checkpoint(directory: str | Path, name: str = "sd15.safetensors") -> Path:
    """The checkpoint `directory/name`, written on first use (e.g. under pytest's basetemp,
    so every test module of a session shares one file). A partial file is never left there.
    """
    path = Path(directory) / name
    if not path.is_file():
        partial = path.with_name(f".{name}.partial")
        write_sd15_checkpoint(partial)
        os.replace(partial, path)
    return path
