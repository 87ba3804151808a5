"""Causal (incremental) estimation: module k is fitted on activations computed with the maps
of modules 1..k-1 already applied (strength 1), for source and target samples alike.

Two exact schedules:

* **lockstep** (default): every batch runs its forward pass in its own worker thread, one
  thread at a time. A worker pauses at each selected module after recording it; once every
  batch has reached that module, its map is fitted and the workers continue with it applied.
  Each sample goes through the model exactly once (the reference restarts the forward pass
  for every module: about K/2 passes for K modules). Memory: the live activations of all
  batches at the module being fitted, as if they were one batch.
* **truncated**: for one module after the other, every batch runs up to that module and is
  stopped there. Memory of one batch, but about (K + 1) / 2 forward passes per sample.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ActError, ModulesNeverRanError
from .fitting import fit_transport
from .hooks import (
    can_modify_in_place,
    group_by_module,
    holds_channels,
    pick_output,
    replace_output,
    resolve_module,
)
from .maps import ModuleMap
from .recording import Pooling, pooled_sample
from .samples import Batch
from .steering import transport_in_place, transported

Progress = Callable[[int, int], None]


class _Stop(Exception):
    """Unwinds a worker's forward pass (abort, or the end of a truncated pass)."""


class _CausalFitter:
    """Shared state of a causal collection: samples so far, fitted maps, and the hooks."""

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str],
        batches: Sequence[Batch],
        method: str,
        support: str,
        pooling: Pooling,
    ) -> None:
        self.groups = group_by_module(sites)
        self.modules = {name: resolve_module(model, name) for name in self.groups}
        self.batches = list(batches)
        self.method = method
        self.support = support
        self.pooling = pooling
        self.maps: dict[str, ModuleMap] = {}
        self.samples: dict[str, dict[int, torch.Tensor]] = {site: {} for site in sites}
        self.order: list[str] = []

    def record(self, name: str, worker: int, output: Any) -> bool:
        """Pool the module's outputs for one batch; False when the batch's selector skips it."""
        batch = self.batches[worker]
        recorded = False
        for site, index in self.groups[name]:
            tensor = pick_output(output, index, site)
            channels = holds_channels(self.modules[name], tensor, site)
            pooled = pooled_sample(
                site,
                tensor,
                batch.attention_mask,
                batch.rows,
                batch.select,
                channels,
                self.pooling,
            )
            if pooled is not None:
                self.samples[site][worker] = pooled
                recorded = True
        return recorded

    def fit(self, name: str) -> None:
        """Fit the maps of one module from every batch's samples."""
        split = {label: {} for label in ("source", "target")}
        for site, _ in self.groups[name]:
            for label in split:
                rows = [
                    pooled
                    for worker, pooled in sorted(self.samples[site].items())
                    if self.batches[worker].label == label
                ]
                if not rows:
                    raise ActError(f"causal collection needs {label} batches; none were given")
                split[label][site] = torch.cat(rows)
        fitted = fit_transport(
            split["source"],
            split["target"],
            self.method,
            self.support,
            per_prompt=not self.pooling.per_token,
        )
        self.maps.update(fitted.maps)
        self.order.append(name)

    def apply(self, name: str, args: tuple, kwargs: dict, output: Any) -> Any:
        """The module output with its fitted maps applied at strength 1."""
        for site, index in self.groups[name]:
            tensor = pick_output(output, index, site)
            coefficients = self.maps[site].coefficients(1.0).to(tensor.device)
            channels = holds_channels(self.modules[name], tensor, site)
            if can_modify_in_place(tensor, self.modules[name], args, kwargs, output):
                transport_in_place(tensor, coefficients, channels)
            else:
                output = replace_output(output, index, transported(tensor, coefficients, channels))
        return output

    def register(self, hook_factory: Callable[[str], Callable]) -> list:
        """Register one forward hook per module; returns the handles."""
        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_hook(hook_factory(name), with_kwargs=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def sample_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(source, target) samples of every site, in fitting order."""
        result: tuple[dict, dict] = ({}, {})
        for name in self.order:
            for site, _ in self.groups[name]:
                for side, label in zip(result, ("source", "target"), strict=True):
                    side[site] = torch.cat(
                        [
                            pooled
                            for worker, pooled in sorted(self.samples[site].items())
                            if self.batches[worker].label == label
                        ]
                    )
        return result

    def check_complete(self) -> None:
        """Raise if some selected module never ran."""
        missing = [name for name in self.groups if name not in self.order]
        if missing:
            raise ModulesNeverRanError(
                f"modules {missing} never ran during collection; check the layer selection",
                missing,
            )


def collect_lockstep(fitter: _CausalFitter, progress: Progress | None) -> None:
    """Run every batch once, pausing all of them at each module until it is fitted."""
    state = _Lockstep(len(fitter.batches))

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            worker = state.current_worker()
            if name not in fitter.maps:
                if not fitter.record(name, worker, output):
                    return None
                state.pause(worker, name)
            return fitter.apply(name, args, kwargs, output)

        return hook

    handles = fitter.register(hook_for)
    threads = [
        threading.Thread(
            target=state.work, args=(i, batch.run), name=f"act-collect-{i}", daemon=True
        )
        for i, batch in enumerate(fitter.batches)
    ]
    try:
        for thread in threads:
            thread.start()
        runnable = list(range(len(threads)))
        while True:
            for worker in runnable:
                state.run_until_paused(worker)
            name, runnable = state.next_module()
            if name is None:
                break
            fitter.fit(name)
            if progress is not None:
                progress(len(fitter.order), len(fitter.groups))
    finally:
        state.abort()
        for thread in threads:
            thread.join()
        for handle in handles:
            handle.remove()


class _Lockstep:
    """Baton passing between worker threads: exactly one runs at a time."""

    def __init__(self, workers: int) -> None:
        self.condition = threading.Condition()
        self.turn: int | None = None
        self.paused_at: dict[int, str] = {}
        self.finished: set[int] = set()
        self.error: BaseException | None = None
        self.aborting = False
        self.workers = workers
        self.local = threading.local()

    def current_worker(self) -> int:
        worker = getattr(self.local, "worker", None)
        if worker is None:
            raise ActError("the model ran outside the collection while causal hooks were active")
        return worker

    def work(self, worker: int, run: Callable[[], Any]) -> None:
        """Thread body: wait for the first turn, run the batch, report the end."""
        self.local.worker = worker
        error = None
        try:
            self._wait_for_turn(worker)
            with torch.inference_mode():
                run()
        except _Stop:
            pass
        except BaseException as raised:  # re-raised in the coordinating thread
            error = raised
        with self.condition:
            self.finished.add(worker)
            if error is not None and self.error is None:
                self.error = error
            self.turn = None
            self.condition.notify_all()

    def pause(self, worker: int, name: str) -> None:
        """Called by a worker at an unfitted module: hand back the baton until it is fitted."""
        with self.condition:
            self.paused_at[worker] = name
            self.turn = None
            self.condition.notify_all()
        self._wait_for_turn(worker)

    def _wait_for_turn(self, worker: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == worker or self.aborting)
            if self.aborting:
                raise _Stop
            self.paused_at.pop(worker, None)

    def run_until_paused(self, worker: int) -> None:
        """Let one worker run until it pauses or finishes; re-raise its error."""
        with self.condition:
            self.turn = worker
            self.condition.notify_all()
            self.condition.wait_for(lambda: self.turn is None)
            if self.error is not None:
                raise self.error

    def next_module(self) -> tuple[str | None, list[int]]:
        """The module every unfinished worker paused at, and those workers."""
        with self.condition:
            if not self.paused_at:
                return None, []
            names = sorted(set(self.paused_at.values()))
            if len(names) > 1:
                raise ActError(
                    f"batches reached different modules first ({', '.join(names)}); causal "
                    "collection needs every batch to run the selected modules in one order"
                )
            if self.finished:
                raise ActError(
                    f"module {names[0]!r} did not run for every batch; causal collection needs "
                    "every batch to run every selected module"
                )
            return names[0], sorted(self.paused_at)

    def abort(self) -> None:
        """Unwind every paused or waiting worker."""
        with self.condition:
            self.aborting = True
            self.condition.notify_all()


def collect_truncated(fitter: _CausalFitter, progress: Progress | None) -> None:
    """Fit module after module, running each batch only up to the module being fitted."""
    current: dict[str, Any] = {"worker": 0, "module": None}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if name in fitter.maps:
                return fitter.apply(name, args, kwargs, output)
            if not fitter.record(name, current["worker"], output):
                return None
            if current["module"] is None:
                current["module"] = name
            elif current["module"] != name:
                raise ActError(
                    f"batches reached different modules first ({current['module']}, {name}); "
                    "causal collection needs every batch to run the selected modules in one order"
                )
            raise _Stop

        return hook

    handles = fitter.register(hook_for)
    try:
        while len(fitter.order) < len(fitter.groups):
            current["module"] = None
            stopped = 0
            for worker, batch in enumerate(fitter.batches):
                current["worker"] = worker
                try:
                    with torch.inference_mode():
                        batch.run()
                except _Stop:
                    stopped += 1
            if stopped == 0:
                break
            if stopped < len(fitter.batches):
                raise ActError(
                    f"module {current['module']!r} did not run for every batch; causal "
                    "collection needs every batch to run every selected module"
                )
            fitter.fit(current["module"])
            if progress is not None:
                progress(len(fitter.order), len(fitter.groups))
    finally:
        for handle in handles:
            handle.remove()
