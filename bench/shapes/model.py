"""The shapes-world text-to-image model: standard diffusers components, sized for 2 CPU cores.

A `StableDiffusionPipeline` of
- a word-level tokenizer over the caption vocabulary (`tokenizers` WordLevel wrapped in
  `PreTrainedTokenizerFast`; bos/eos like CLIP, padded with eos to 32 tokens),
- a 2-layer `CLIPTextModel` (width 64),
- an `AutoencoderKL` mapping 32×32×3 images to 8×8×8 latents,
- a `UNet2DConditionModel` at 8×8 (64 channels) and 4×4 (128 channels), cross-attention
  at both levels and in the middle block,
- a cosine-schedule `DDPMScheduler` for training and a `DDIMScheduler` ("leading" spacing)
  for sampling.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from .captions import WORD_PATTERN, vocabulary
from .world import IMAGE_SIZE

MODEL_DIR = Path(__file__).resolve().parent / "model"
MAX_TOKENS = 32
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"
TEXT_WIDTH = 64
LATENT_SIZE = IMAGE_SIZE // 4
LATENT_CHANNELS = 8  # 4 left the decoder guessing colours and small shapes (see README)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cased words and punctuation runs, bos + words + eos, padded
    with eos; words outside `captions.vocabulary()` become <unk>."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tokens = [BOS, EOS, UNK, *vocabulary()]
    core = Tokenizer(WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), "removed", invert=True)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_TOKENS,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    """A 2-layer, 64-wide CLIP text transformer (causal, like CLIP)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    """32×32×3 ↔ 8×8×8, fully convolutional (no attention in the middle block)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_unet() -> UNet2DConditionModel:
    """Two levels (8×8, 4×4) and the middle block, each with text cross-attention."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads
    )


def training_scheduler() -> DDPMScheduler:
    """1000-step DDPM with the cosine schedule (it keeps low-resolution latents informative
    for longer than SD's scaled-linear one); predicts the noise."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        steps_offset=1,  # what StableDiffusionPipeline expects; sampling starts at 961
    )


def sampling_scheduler() -> DDIMScheduler:
    """DDIM on the training schedule with "leading" spacing (SD's): 25 steps run from
    timestep 961 down to 1, not from 999.

    At the cosine schedule's last timesteps ᾱ is nearly 0, and the clean latents that DDIM
    derives from a noise prediction, (x − √(1 − ᾱ)·ε̂) / √ᾱ, multiply any error in ε̂ by
    1/√ᾱ: a first step from timestep 999 overshoots by orders of magnitude and the images
    come out as saturated noise. (Clipping those estimates would also work, but
    `StableDiffusionPipeline` switches `clip_sample` off when it loads a scheduler.)"""
    return DDIMScheduler.from_config(
        training_scheduler().config, timestep_spacing="leading", set_alpha_to_one=False
    )


def assemble(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: PreTrainedTokenizerFast,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of trained components (no safety checker), in eval mode."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for component in (vae, text_encoder, unet):
        component.eval()
    return pipe


def save_pipeline(pipe: StableDiffusionPipeline, path: str | Path) -> None:
    """`save_pretrained` with the UNet and VAE stored in float16 (half the folder) and the
    text encoder in float32: diffusers loads float16 weights as float32 by default, but
    transformers 5 keeps a model's stored dtype, so this way everything loads as float32.

    **Mutates** nothing: the components are cast back after saving."""
    for module in (pipe.unet, pipe.vae):
        module.half()
    try:
        pipe.save_pretrained(path)
    finally:
        for module in (pipe.unet, pipe.vae):
            module.float()


def load_pipeline(path: str | Path = MODEL_DIR) -> StableDiffusionPipeline:
    """The trained pipeline from its folder (offline, no progress bar)."""
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no pipeline at {path}: train one with `python -m bench.shapes.train --out {path}`"
        )
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
