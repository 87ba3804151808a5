"""Core benchmarks: fitting cost (pooled and per-token samples), steering overhead, causal
collection cost.

Prints ratios measured in one process (medians of alternating pairs), as these machines are
noisy. Run: `python bench/core.py` (add `--quick` for smaller sizes).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from timing import paired_ratio, pin_malloc

pin_malloc()

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/: the residual block of the stack

import torch  # noqa: E402
from helpers import Block  # noqa: E402
from torch import nn  # noqa: E402

from act import Batch, bake, collect, fit_transport, select_modules, steer  # noqa: E402


def bench_fit(modules: int, units: int, samples: int) -> None:
    generator = torch.Generator().manual_seed(0)
    source = {f"m{i}": torch.randn(samples, units, generator=generator) for i in range(modules)}
    target = {k: v * 1.3 + 0.2 for k, v in source.items()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    fit_transport(source, target, "linear", "range")
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"fit {samples}+{samples} samples x {modules * units} units ({modules} x {units}): "
        f"{elapsed:.2f} s, peak working memory {peak / 2**20:.0f} MB "
        f"(inputs {2 * modules * units * samples * 4 / 2**20:.0f} MB; "
        f"max RSS grew {(rss_after - rss_before) / 1024:.0f} MB)"
    )


def bench_per_token(modules: int, width: int, prompts: int, tokens: int) -> None:
    """Collection and fit with per-token pooling, `prompts * tokens` samples a side: the fit
    is the one `bench_fit` times for that many pooled samples."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.LayerNorm(width) for _ in range(modules))).eval()
    sites = select_modules(model, "norms")
    x = torch.randn(prompts, tokens, width)
    mask = torch.ones(prompts, tokens)
    runs = [
        Batch(lambda: model(x), "source", attention_mask=mask),
        Batch(lambda: model(x * 1.3 + 0.2), "target", attention_mask=mask),
    ]
    start = time.perf_counter()
    samples = collect(model, sites, runs, pooling="tokens", max_tokens=tokens)
    collected = time.perf_counter() - start
    start = time.perf_counter()
    samples.fit("linear", "range")
    fitted = time.perf_counter() - start
    print(
        f"per-token: {prompts} prompts x {tokens} tokens = {prompts * tokens} samples a side x "
        f"{modules * width} units: collection {collected:.2f} s, fit {fitted:.2f} s"
    )


def bench_steering(depth: int, width: int, batch: int, tokens: int, pairs: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(width) for _ in range(depth))).eval()
    x = torch.randn(batch, tokens, width)
    sites = select_modules(model, "norms")
    samples = collect(
        model,
        sites,
        [Batch(lambda: model(x[:4]), "source"), Batch(lambda: model(x[4:] * 1.2 + 0.1), "target")],
    )
    plain = forward_plain(model, x)
    print(f"steering {depth} blocks of width {width}, batch {batch} x {tokens} tokens:")
    for support in ("all", "range"):
        steered = copy.deepcopy(model)
        with steer(steered, samples.fit("linear", support), 1.0):
            ratio = paired_ratio(plain, forward_plain(steered, x), pairs)
        print(f"  hooked / plain, support {support!r}: {ratio:.3f}")
    baked = copy.deepcopy(model)
    bake(baked, samples.fit("linear", "all"), 1.0)
    ratio = paired_ratio(plain, forward_plain(baked, x), pairs)
    print(f"  baked / plain: {ratio:.3f}")


def forward_plain(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            model(x)

    return forward


def bench_causal(depth: int, width: int, batches: int, batch: int, tokens: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(width) for _ in range(depth))).eval()
    sites = select_modules(model, "norms")
    inputs = [torch.randn(batch, tokens, width) * (1 + (i % 2)) for i in range(batches)]
    runs = [
        Batch(lambda x=x: model(x), "source" if i % 2 == 0 else "target")
        for i, x in enumerate(inputs)
    ]

    def timed(**kwargs) -> float:
        start = time.perf_counter()
        samples = collect(model, sites, runs, **kwargs)
        samples.fit("linear", "range")
        return time.perf_counter() - start

    timed()
    simultaneous = statistics.median(timed() for _ in range(3))
    lockstep = statistics.median(timed(causal=True) for _ in range(3))
    truncated = timed(causal=True, max_live_batches=1)
    print(
        f"causal collection, K = {len(sites)} modules, {batches} batches of {batch} x {tokens} "
        f"(collect + fit): lockstep / simultaneous {lockstep / simultaneous:.2f}x, "
        f"truncated / simultaneous {truncated / simultaneous:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        bench_fit(modules=5, units=512, samples=256)
        bench_per_token(modules=5, width=512, prompts=8, tokens=32)
        bench_steering(depth=4, width=256, batch=8, tokens=32, pairs=5)
        bench_causal(depth=4, width=64, batches=4, batch=8, tokens=16)
    else:
        bench_fit(modules=50, units=2048, samples=1024)
        bench_per_token(modules=50, width=2048, prompts=16, tokens=64)
        bench_steering(depth=24, width=1024, batch=8, tokens=128, pairs=15)
        bench_causal(depth=24, width=256, batches=8, batch=16, tokens=64)


if __name__ == "__main__":
    main()
