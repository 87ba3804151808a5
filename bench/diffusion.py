"""Diffusers front end benchmarks on an SD1.5-shaped UNet (random weights: timing only).

Prints ratios measured in one process, alternating the runs compared, as these machines are
noisy: time per denoising step steered / plain (all 109 norm modules, support "range"; also
with a step range and cond_only, and baked / plain for the exactly foldable LayerNorms),
collection time for 32 + 32 prompts / the same number of plain denoiser calls, peak memory.
Run: `python bench/diffusion.py` (`--quick` for a small UNet smoke run).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from timing import paired_ratio, pin_malloc

pin_malloc()

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/: the offline tokenizer
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusion_fixtures import clip_tokenizer  # noqa: E402

from act import Samples, bake  # noqa: E402
from act.diffusers.anatomy import pipeline_root  # noqa: E402
from act.diffusers.collection import collect_pipeline  # noqa: E402
from act.diffusers.steering import steer_pipeline  # noqa: E402
from act.steering import transport_in_place  # noqa: E402

SUBJECTS = ["a cat", "a lighthouse", "an old man", "a bowl of fruit", "a city street", "a horse"]
PLACES = ["on a hill", "at night", "in the rain", "by the sea", "in a forest", "in winter"]


def prompts(count: int, style: str) -> list[str]:
    return [f"{s} {p}{style}" for s in SUBJECTS for p in PLACES][:count]


def build(quick: bool):
    """A StableDiffusionPipeline around an SD1.5-shaped UNet (tiny VAE and text encoder)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(0)
    if quick:
        unet = UNet2DConditionModel(
            block_out_channels=(64, 128),
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    else:  # SD1.5's shape: 860 M parameters, 109 norm modules
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=1,
        num_attention_heads=12,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for component in (vae, unet, pipe.text_encoder):
        component.eval()
    return pipe


def hook_work(pipe, transport, step: Callable[[], None], repeats: int = 5) -> float:
    """Seconds per step that the steering hooks' tensor work takes, timed on their own: the
    maps applied in place to copies of one step's outputs of every steered module."""
    outputs, handles = {}, []
    for site in transport.sites:
        module = pipe.unet.get_submodule(site.removeprefix("unet."))
        handles.append(
            module.register_forward_hook(lambda m, a, o, s=site: outputs.update({s: o.clone()}))
        )
    step()
    for handle in handles:
        handle.remove()
    coefficients = {s: m.coefficients(1.0) for s, m in transport.maps.items()}
    times = []
    for _ in range(repeats):
        copies = {site: tensor.clone() for site, tensor in outputs.items()}
        start = time.perf_counter()
        for site, tensor in copies.items():
            transport_in_place(tensor, coefficients[site])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small UNet, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--pairs", type=int, default=11, help="timed pairs per steering ratio")
    parser.add_argument("--prompts", type=int, default=32, help="source (= target) prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = build(args.quick)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); UNet "
        f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M parameters, built in "
        f"{time.perf_counter() - start:.0f} s; max RSS {max_rss_gb():.1f} GB"
    )
    pipe.scheduler.set_timesteps(30)
    step = pipe.scheduler.timesteps[0]
    latents = torch.randn(2, 4, 32, 32)
    context = torch.randn(2, 77, 768)

    def plain() -> None:
        with torch.inference_mode():
            pipe.unet(latents, step, encoder_hidden_states=context)

    calls = 8  # per round: 4 + 4 prompts, one denoiser call (batch 2: CFG) each
    source, target = prompts(args.prompts, ""), prompts(args.prompts, ", watercolor painting")
    options = {"height": 64, "width": 64, "num_inference_steps": 30, "progress": False}
    collected, plain_time, collect_time = [], 0.0, 0.0
    for begin in range(0, args.prompts, calls // 2):
        tick = time.perf_counter()
        for _ in range(calls):
            plain()
        middle = time.perf_counter()
        collected.append(
            collect_pipeline(
                pipe,
                source[begin : begin + calls // 2],
                target[begin : begin + calls // 2],
                batch_size=1,
                **options,
            )
        )
        plain_time += middle - tick
        collect_time += time.perf_counter() - middle
        if begin == 0:
            plain_rss = max_rss_gb()
    first = collected[0]
    source_rows, target_rows = (
        {site: torch.cat([getattr(part, side)[site] for part in collected]) for site in first.sites}
        for side in ("source", "target")
    )
    samples = Samples(
        source_rows,
        target_rows,
        first.model_class,
        first.module_params,
        info=first.info,
        pooling=first.pooling,
    )
    pooled = sum(t.numel() * 4 for side in (samples.source, samples.target) for t in side.values())
    print(
        f"collection, {args.prompts} + {args.prompts} prompts ({len(samples.sites)} modules, "
        f"{sum(t.shape[1] for t in samples.source.values())} units), batch 1 + CFG: "
        f"{collect_time:.0f} s; {2 * args.prompts} plain denoiser calls of batch 2: "
        f"{plain_time:.0f} s; ratio {collect_time / plain_time:.3f}"
    )
    print(
        f"peak memory (max RSS): {plain_rss:.2f} GB after plain denoiser calls, "
        f"{max_rss_gb():.2f} GB after collection; samples ({samples.pooling.kind}) "
        f"{pooled / 2**20:.1f} MB"
    )
    tick = time.perf_counter()
    ranged = samples.fit("linear", "range")
    print(f"fit ({len(ranged.sites)} modules, support range): {time.perf_counter() - tick:.1f} s")

    def steered(**controls) -> Callable[[], None]:
        def run() -> None:
            with steer_pipeline(pipe, ranged, **controls):
                plain()

        return run

    tick = time.perf_counter()
    plain()
    seconds = time.perf_counter() - tick
    work = hook_work(pipe, ranged, plain)
    print(
        f"one plain step {seconds:.2f} s; the steering hooks' tensor work, timed alone: "
        f"{work * 1000:.0f} ms per step ({work / seconds:.2%} of a step)"
    )
    print("time per denoising step, batch 2 x 4 x 32 x 32 latents, ratio to plain:")
    ratio = paired_ratio(plain, steered(), args.pairs)
    print(f"  steered, all {len(ranged.sites)} norm modules, support 'range': {ratio:.3f}")
    pipe._guidance_scale = 7.5  # what a CFG pipeline call sets: cond_only steers rows 1:
    ratio = paired_ratio(plain, steered(steps=(0.0, 0.5), cond_only=True), args.pairs)
    print(f"  steered with steps=(0, 0.5) and cond_only (this step inside): {ratio:.3f}")
    layer_norms = [s for s in samples.sites if ".transformer_blocks." in s]
    exact = samples.fit("linear", "all").subset(layer_norms)
    root = pipeline_root(pipe, ["unet"])

    def baked() -> None:
        handle = bake(root, exact, 1.0)
        try:
            plain()
        finally:
            handle.restore()

    ratio = paired_ratio(plain, baked, args.pairs)
    print(f"  baked, the {len(layer_norms)} LayerNorms (GroupNorm maps cannot fold): {ratio:.3f}")


if __name__ == "__main__":
    main()
