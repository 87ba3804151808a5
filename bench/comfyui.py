"""The node pack in a real ComfyUI (CPU): steering and collection cost on DiT-shaped models.

Builds a FLUX-shaped and an SD3-shaped diffusion model from ComfyUI's own classes (random
weights: timing only, at a width a CPU can run), then prints, per model, ratios measured in
one process: a KSampler step steered by Apply AcT ("auto" layers, support "all") / the same
step unsteered (median of alternating pairs), and Collect Activations for N + N prompts / the
same number of plain one-step samplings; with `--end-to-end STEPS` and one of `--models`, an
end-to-end fit on that model (time per step, memory: peak memory is the process's, so one model
per run). Needs COMFYUI_PATH (a ComfyUI checkout) and a Python with ComfyUI's requirements.
Run: `COMFYUI_PATH=... python bench/comfyui.py` (`--quick`, `--models sd3`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time
from pathlib import Path

from timing import paired_ratio, pin_malloc

pin_malloc()

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/: building models as ComfyUI does
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from comfy_support import (  # noqa: E402
    PACK,
    TINY_FLUX,
    TINY_SD3,
    encode,
    load_pack,
    sample,
    start_comfy,
    temporary_base,
    tiny_clip,
)

SUBJECTS = ["a cat", "a lighthouse", "an old man", "a bowl of fruit", "a city street", "a horse"]


def build(kind: str, quick: bool):
    """A ModelPatcher around a FLUX- or SD3-shaped model (wider and deeper than the tests')."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_support import init_weights

    if kind == "flux":
        width, depth = (64, 2) if quick else (512, 4)
        config = dict(TINY_FLUX, hidden_size=width, num_heads=width // 64, depth=depth)
        config.update(depth_single_blocks=2 * depth, axes_dim=[16, 24, 24])
        model_config = comfy.supported_models.Flux(config)
    else:
        depth = 2 if quick else 8  # MMDiT: width 64 x depth, heads = depth
        model_config = comfy.supported_models.SD3(
            dict(TINY_SD3, depth=depth)
            | {
                "context_embedder_config": {
                    "target": "torch.nn.Linear",
                    "params": {"in_features": 32, "out_features": 64 * depth},
                }
            }
        )
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({}, "")
    init_weights(base.diffusion_model)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def bench(nodes, kind: str, prompts: int, pairs: int, quick: bool) -> None:
    model, clip = build(kind, quick), tiny_clip()
    cfg = 1.0 if kind == "flux" else 5.0
    extra = {"guidance": 3.5} if kind == "flux" else {}
    conds = encode(clip, "a photo of a cat", **extra), encode(clip, "", **extra)
    size = 8 if quick else 32  # latent side: 64 or 256 pixels
    source = "\n".join(SUBJECTS[i % len(SUBJECTS)] + f", view {i}" for i in range(prompts))
    target = "\n".join(line + ", watercolor painting" for line in source.splitlines())
    collect = nodes["AcTCollectActivations"]
    arguments = dict(
        model=model, clip=clip, source_prompts=source, target_prompts=target,
        where="diffusion model", layers="auto", seed=0, width=8 * size, height=8 * size,
        steps=1, batch_size=1, causal=False, method="linear", support="all",
        cache="off",  # time the collection itself, not a cache hit
    )  # fmt: skip
    start = time.perf_counter()
    samples = collect.execute(**arguments).result[0]
    collect_time = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(2 * prompts):
        sample(model, *conds, steps=1, cfg=1.0, size=size)
    plain_time = time.perf_counter() - start
    transport = nodes["AcTFitTransport"].execute(samples=samples, method="linear", support="all")
    steered = nodes["AcTApply"].execute(
        transport=transport.result[0], model=model, clip=None, strength_model=1.0,
        strength_clip=1.0, start_percent=0.0, end_percent=1.0, apply_to="positive only",
    ).result[0]  # fmt: skip
    parameters = sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6
    print(
        f"{kind}: {type(model.model.diffusion_model).__name__}, {parameters:.0f} M parameters, "
        f"latent {size} x {size}, {len(samples.sites)} sites ({samples.summary()})"
    )
    print(
        f"  collection of {prompts} + {prompts} prompts / {2 * prompts} plain one-step "
        f"samplings: {collect_time / plain_time:.3f} ({collect_time:.1f} s / {plain_time:.1f} s)"
    )
    ratio = paired_ratio(
        lambda: sample(model, *conds, steps=1, cfg=cfg, size=size),
        lambda: sample(steered, *conds, steps=1, cfg=cfg, size=size),
        pairs,
    )
    print(
        f"  one sampling step, steered / plain (cfg {cfg:g}, median of {pairs} pairs): {ratio:.3f}"
    )


def bench_end_to_end(nodes, kind: str, prompts: int, steps: int, quick: bool) -> None:
    """Fit Transport's method end-to-end on the FLUX- or SD3-shaped model, loaded and run under
    inference mode as ComfyUI does: time per training step against the collection, and the
    peak memory it adds against the size of the weights (it holds a copy of them)."""
    with torch.inference_mode():
        model, clip = build(kind, quick), tiny_clip()
    size = 8 if quick else 32
    source = "\n".join(SUBJECTS[i % len(SUBJECTS)] + f", view {i}" for i in range(prompts))
    target = "\n".join(line + ", watercolor painting" for line in source.splitlines())
    arguments = dict(
        model=model, clip=clip, source_prompts=source, target_prompts=target,
        where="diffusion model", layers="auto", seed=0, width=8 * size, height=8 * size,
        steps=1, batch_size=4, causal=False, method="linear", support="all", cache="off",
    )  # fmt: skip
    with torch.inference_mode():
        start = time.perf_counter()
        samples = nodes["AcTCollectActivations"].execute(**arguments).result[0]
        collect_time = time.perf_counter() - start
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        output = nodes["AcTFitTransport"].execute(
            samples=samples, method="end-to-end", support="all", training_steps=steps
        )
        fit_time = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    losses = output.result[0].info["end-to-end"]["loss"]
    print(
        f"{kind}, end-to-end fit ({steps} steps, {prompts} + {prompts} prompts, batch 4, "
        f"{len(samples.sites)} sites):\n  one training step / the collection: "
        f"{fit_time / steps / collect_time:.2f} ({fit_time / steps:.1f} s / {collect_time:.1f} "
        f"s); peak RSS {peak - before:+.0f} MB over the collection's, weights "
        f"{weights / 2**20:.0f} MB; loss {losses['plain']:.3f} -> {losses['fitted']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--prompts", type=int, default=8, help="source (= target) prompts")
    parser.add_argument("--pairs", type=int, default=11, help="timed pairs per ratio")
    parser.add_argument(
        "--models", nargs="+", choices=["flux", "sd3"], default=["flux", "sd3"],
        help="the models to measure",
    )  # fmt: skip
    parser.add_argument(
        "--end-to-end", type=int, metavar="STEPS", help="also time an end-to-end fit"
    )
    args = parser.parse_args()
    if args.end_to_end and len(args.models) != 1:
        parser.error("--end-to-end measures peak memory, so it needs one of --models")
    torch.set_num_threads(args.threads)
    base = temporary_base()
    start_comfy(base)
    load_pack()
    extension = importlib.import_module(f"{PACK}.nodes.extension")
    nodes = {node.define_schema().node_id: node for node in extension.NODES}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), ComfyUI on the CPU")
    for kind in args.models:
        bench(nodes, kind, args.prompts, args.pairs, args.quick)
    if args.end_to_end:
        bench_end_to_end(nodes, args.models[0], args.prompts, args.end_to_end, args.quick)


if __name__ == "__main__":
    main()
