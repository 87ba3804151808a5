"""The optimisation loop the training stages share: AdamW, warm-up + cosine learning rate,
gradient clipping, a periodic log line and resumable checkpoints."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

WARMUP_STEPS = 100


def learning_rate_factor(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine down to 10%."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimise(
    name: str,
    path: Path,
    modules: dict[str, torch.nn.Module],
    lr: float,
    total: int,
    loss_at: Callable[[int], torch.Tensor],
    after_step: Callable[[], None] = lambda: None,
    log_every: int = 25,
    checkpoint_every: int = 100,
) -> float:
    """Optimise `loss_at(step)` for steps [resumed step, total); returns training seconds.

    **Mutates** `modules` (trained in place, loaded from `path` when it exists); checkpoints
    weights, optimiser, schedule and elapsed time to `path`.
    """
    parameters = [p for module in modules.values() for p in module.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    factor = functools.partial(learning_rate_factor, total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    start, elapsed = 0, 0.0
    if path.exists():
        state = torch.load(path, weights_only=True)  # tensors and plain values only
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"{name}: resumed at step {start}/{total} ({elapsed / 60:.1f} min so far)")

    def save(step: int) -> None:
        state = {key: module.state_dict() for key, module in modules.items()}
        state |= {"optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict()}
        torch.save(state | {"step": step, "elapsed": elapsed}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    for module in modules.values():
        module.train()
    losses, tick = [], time.perf_counter()
    for step in range(start, total):
        loss = loss_at(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        after_step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == total:
            now = time.perf_counter()
            elapsed += now - tick
            per_step = (now - tick) / len(losses)
            left = (total - step - 1) * per_step / 60
            print(
                f"{name} {step + 1}/{total} loss {np.mean(losses):.4f} "
                f"{per_step:.2f} s/step, {elapsed / 60:.1f} min, ~{left:.0f} min left",
                flush=True,
            )
            losses, tick = [], now
        if (step + 1) % checkpoint_every == 0 or step + 1 == total:
            save(step + 1)
    for module in modules.values():
        module.eval()
    return elapsed
