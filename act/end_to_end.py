"""End-to-end transport: the per-unit affine maps of every site fitted jointly through the model.

Linear-AcT fits each site on its own, from activations that no earlier map has moved; fitted
from few prompts, the errors of the maps compound through the network. The end-to-end fit
(LinEAS, Rodriguez et al., arXiv 2503.10679) trains the same maps `T(a) = omega * a + beta`
with gradients, all at once:

- targets: the target batches' samples at every site (pooled as the collection says), recorded
  once without gradients, with no map applied;
- steered source: the source batches run through the model with every map applied at strength
  1 (`act.steering.transported`, the maths `act.steer` applies), pooled at every site;
- loss (`act.wasserstein`): per site, the squared 1-D Wasserstein-2 distance per unit between
  steered source and target, averaged over units and divided by the site's target scale s^2
  (the mean over units of the target variance), summed over sites. The identity maps have the
  loss of the plain model;
- parameters per unit: omega and b = beta / s (a shift in units of the site's scale, so one
  learning rate suits every site), started at Linear-AcT's solution or at the identity and
  trained with Adam (`act.sparse_adam`);
- sparsity lambda: a group-lasso penalty `lambda * mean over units of |(omega - 1, b)|` per
  site, applied as a proximal step after each Adam step: units that do not lower the loss
  enough return exactly to the identity (omega = 1, beta = 0);
- support: "all" transports every activation; "range" (or "qNN") gates each map to the range
  of the source samples arriving at the site with the earlier maps applied, taken from the
  previous step (the first from the plain model). The transport stores the bounds its final
  evaluation pass used, so `act.steer` with it computes what that pass computed.

Only the maps are trained: the model's parameters have `requires_grad` turned off for the fit
and restored afterwards; its weights are never written.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .collection import collect
from .errors import ActError, ModulesNeverRanError
from .fitting import fit_transport
from .hooks import (
    check_width,
    group_by_module,
    holds_channels,
    module_fingerprint,
    pick_output,
    replace_output,
    resolve_module,
)
from .maps import END_TO_END, Coefficients, ModuleMap, Support
from .recording import DEFAULT_MAX_TOKENS, Pooling, pooled_sample
from .samples import Batch, Samples
from .sparse_adam import SparseAdam
from .steering import transported
from .transport import Transport
from .wasserstein import SiteTarget, wasserstein_loss

INITS = ("identity", "linear")
Progress = Callable[[int, int, float], None]
"""`progress(step, steps, loss)` after every step; it may raise to cancel the fit."""


@dataclass(frozen=True)
class EndToEnd:
    """Settings of an end-to-end fit (see the module docstring).

    Attributes:
        steps: Adam steps; each runs the chosen source batches forward and backward.
        learning_rate: Adam's step size, in the units of omega and of beta / s.
        sparsity: group-lasso strength lambda; 0 keeps every unit.
        seed: seeds the choice of source batches per step (`batches_per_step`).
        init: "identity" (omega = 1, beta = 0) or "linear" (Linear-AcT's closed-form maps on
            the plain samples).
        batches_per_step: source batches per step, drawn at random (None: all of them); fewer
            bound the memory of the backward pass to that many batches' activations.
    """

    steps: int = 50
    learning_rate: float = 0.02
    sparsity: float = 0.0
    seed: int = 0
    init: str = "identity"
    batches_per_step: int | None = None

    def __post_init__(self) -> None:
        _whole(self.steps, "steps", 1)
        _whole(self.seed, "seed", None)
        if self.batches_per_step is not None:
            _whole(self.batches_per_step, "batches_per_step", 1)
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise ActError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not _finite(self.sparsity) or self.sparsity < 0:
            raise ActError(f"sparsity must be a number >= 0 (0: none), got {self.sparsity!r}")
        if self.init not in INITS:
            raise ActError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")


def settings_from_options(
    method: str,
    given: EndToEnd | None,
    options: dict,
    *,
    parts: str = "site",
    seed_name: str = "seed",
    defaults: EndToEnd | None = None,
) -> EndToEnd | None:
    """The end-to-end settings of a front end's fit call, taken out of its keyword `options`.

    `given` is an `EndToEnd` passed as such; the settings may also come by name among
    `options` (popped from it), the seed under `seed_name` where the front end's own `seed`
    means something else; the others are `given`'s, else the front end's `defaults`, else
    `EndToEnd()`'s. Returns the settings for method "end-to-end", else None.

    Raises:
        ActError: `causal` with method "end-to-end" (it trains every `parts` jointly), or
            end-to-end settings given with another method.
    """
    names = {name: name for name in EndToEnd.__dataclass_fields__ if name != "seed"}
    names[seed_name] = "seed"
    chosen = {name: options.pop(name) for name in names if name in options}
    if method != END_TO_END:
        if chosen or given is not None:
            shown = ", ".join(chosen) or "end_to_end"
            raise ActError(f"{shown}: options of method 'end-to-end', not of {method!r}")
        return None
    if options.pop("causal", False):
        raise ActError(
            f"causal: method 'end-to-end' trains every {parts} jointly; causal estimation "
            "applies to the methods fitted from samples"
        )
    fields = {names[name]: value for name, value in chosen.items()}
    return dataclasses.replace(given or defaults or EndToEnd(), **fields)


def _whole(value: object, name: str, least: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ActError(f"{name} must be a whole number, got {value!r}")
    if least is not None and value < least:
        raise ActError(f"{name} must be at least {least}, got {value}")


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


class _Site:
    """The trained parameters of one site: omega and b = beta / scale, and its bounds."""

    def __init__(self, omega: torch.Tensor, beta: torch.Tensor, target: SiteTarget) -> None:
        self.target = target
        self.scale = torch.tensor(target.scale, dtype=torch.float32)
        self.omega = omega.detach().clone().requires_grad_(True)
        self.shift = (beta.detach() / self.scale).requires_grad_(True)
        self.lo = torch.full_like(self.omega, -math.inf, requires_grad=False)
        self.hi = torch.full_like(self.omega, math.inf, requires_grad=False)

    @property
    def beta(self) -> torch.Tensor:
        """beta = b * scale (differentiable)."""
        return self.shift * self.scale

    def coefficients(self) -> Coefficients:
        """The map at strength 1 (differentiable in omega and b)."""
        return Coefficients(self.omega, self.beta, self.lo, self.hi)


class _Hooks:
    """Forward hooks that transport every site with its current map and pool its outputs."""

    def __init__(self, model: nn.Module, sites: dict[str, _Site], pooling: Pooling) -> None:
        self.sites = sites
        self.pooling = pooling
        self.batch: Batch | None = None
        self.steered: dict[str, list[torch.Tensor]] = {}
        self.arriving: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        try:
            for name, entries in group_by_module(sites).items():
                module = resolve_module(model, name)
                self.handles.append(module.register_forward_hook(self._hook(entries)))
        except BaseException:
            self.remove()
            raise

    def _hook(self, entries: list[tuple[str, int | None]]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            for site, index in entries:
                tensor = pick_output(output, index, site)
                channels = holds_channels(module, tensor, site)
                check_width(tensor, self.sites[site].omega.shape[0], site, channels)
                coefficients = self.sites[site].coefficients().to(tensor.device)
                moved = transported(tensor, coefficients, channels)
                output = replace_output(output, index, moved)
                steered = self._pool(site, moved, channels)
                if steered is not None:
                    self.steered.setdefault(site, []).append(steered)
                    arriving = self._pool(site, tensor.detach(), channels)
                    self.arriving.setdefault(site, []).append(arriving)
            return output

        return hook

    def _pool(self, site: str, tensor: torch.Tensor, channels: bool) -> torch.Tensor | None:
        batch = self.batch
        if batch is None:
            raise ActError("the model ran outside the end-to-end fit while its hooks were active")
        return pooled_sample(
            site, tensor, batch.attention_mask, batch.rows, batch.select, channels, self.pooling
        )

    def run(self, batch: Batch, need_gradients: bool) -> tuple[dict, dict]:
        """Run one batch: its steered samples and its arriving (unsteered) samples per site."""
        self.batch, self.steered, self.arriving = batch, {}, {}
        try:
            batch.run()
        finally:
            self.batch = None
        steered = {site: torch.cat(rows) for site, rows in self.steered.items()}
        arriving = {site: torch.cat(rows) for site, rows in self.arriving.items()}
        if need_gradients and steered and not any(t.requires_grad for t in steered.values()):
            raise ActError(
                "a source batch ran without autograd (its run() computes under torch.no_grad "
                "or torch.inference_mode), so no gradient reaches the maps; the end-to-end fit "
                "needs batches whose run() calls the model plainly"
            )
        return steered, arriving

    def remove(self) -> None:
        """Remove every hook."""
        while self.handles:
            self.handles.pop().remove()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Turn off `requires_grad` on every parameter of `model`; restored on exit, also on error
    (an inference tensor's flag, which only inference mode may turn on, is restored there)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            with torch.inference_mode(parameter.is_inference()):
                parameter.requires_grad_(flag)


def fit_end_to_end(
    model: nn.Module,
    sites: Sequence[str],
    batches: Sequence[Batch],
    settings: EndToEnd | None = None,
    *,
    support: str = "range",
    pooling: str = "mean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Progress | None = None,
    info: dict | None = None,
) -> Transport:
    """Fit the maps of `sites` jointly, end to end (see the module docstring).

    Args:
        model: the module whose submodules `sites` names (from `select_modules`).
        sites: where the maps go.
        batches: forward passes labelled "source" or "target"; the source batches' `run()`
            must let autograd through (no `torch.no_grad` inside).
        settings: steps, learning rate, sparsity, seed, init, batches per step.
        support: "range", "all" or "qNN" (see the module docstring).
        pooling / max_tokens: how outputs become samples, as in `act.collect`.
        progress: called as `progress(step, steps, loss)`; it may raise to cancel.
        info: free-form fields stored in the transport.

    Returns:
        A Transport (method "end-to-end") for `act.steer`, baking and saving. Its info holds
        the settings and the losses of the plain model, of the start and of the fitted maps.
        **Runs the model**: its parameters are frozen meanwhile; hooks are removed and
        `requires_grad` restored on exit, also on error or interruption (nothing is returned
        then).
    """
    settings = settings or EndToEnd()
    rule = Support.parse(support)
    plain = collect(model, sites, batches, pooling=pooling, max_tokens=max_tokens)
    trained = _start(plain, settings.init, rule)
    sources = [batch for batch in batches if batch.label == "source"]
    losses = {"plain": float(wasserstein_loss(plain.source, plain.target))}
    with frozen(model), torch.enable_grad():
        hooks = _Hooks(model, trained, plain.pooling)
        try:
            losses.update(_train(hooks, trained, sources, settings, rule, progress))
        finally:
            hooks.remove()
    maps = {site: _fitted_map(trained[site], plain.target[site], rule) for site in trained}
    counts = [min(len(values) for values in side.values()) for side in (plain.source, plain.target)]
    settings_info = {name: getattr(settings, name) for name in settings.__dataclass_fields__}
    fields = {**plain.info, **(info or {}), END_TO_END: {**settings_info, "loss": losses}}
    return Transport(
        maps,
        END_TO_END,
        support,
        *counts,
        model_class=type(model).__name__,
        module_params=module_fingerprint(model, list(maps)),
        info=fields,
    )


def _start(plain: Samples, init: str, rule: Support) -> dict[str, _Site]:
    """Every site's starting map (the identity or Linear-AcT's), bounded by the plain source."""
    linear = None
    if init == "linear":
        per_prompt = not plain.pooling.per_token
        linear = fit_transport(plain.source, plain.target, "linear", "all", per_prompt=per_prompt)
    trained = {}
    for site, source in plain.source.items():
        if linear is None:
            omega, beta = torch.ones(source.shape[1]), torch.zeros(source.shape[1])
        else:
            omega, beta = linear.maps[site].omega, linear.maps[site].beta
        trained[site] = _Site(omega, beta, SiteTarget(plain.target[site]))
        trained[site].lo, trained[site].hi = _bounds(source, rule)
    return trained


def _bounds(samples: torch.Tensor, rule: Support) -> tuple[torch.Tensor, torch.Tensor]:
    """The support rule's (lo, hi) per unit of (N, D) samples, float32."""
    rows = samples.detach().to("cpu", torch.float32).numpy().T.copy()
    rows.sort(axis=1)
    return tuple(torch.from_numpy(bound.astype("float32")) for bound in rule.bounds(rows))


def _train(
    hooks: _Hooks,
    trained: dict[str, _Site],
    sources: list[Batch],
    settings: EndToEnd,
    rule: Support,
    progress: Progress | None,
) -> dict[str, float]:
    """Adam steps on the sites' maps; the losses of the start and of the fitted maps."""
    optimiser = SparseAdam(
        [(site.omega, site.shift) for site in trained.values()],
        settings.learning_rate,
        settings.sparsity,
    )
    chooser = torch.Generator().manual_seed(settings.seed)
    per_step = min(settings.batches_per_step or len(sources), len(sources))
    arriving: dict[int, dict[str, torch.Tensor]] = {}
    start = _evaluate(hooks, trained, sources, arriving)
    _update_bounds(trained, arriving, rule)
    for step in range(1, settings.steps + 1):
        chosen = torch.randperm(len(sources), generator=chooser)[:per_step].sort().values
        steered = {}
        for index in chosen.tolist():
            parts, arriving[index] = hooks.run(sources[index], need_gradients=True)
            for site, samples in parts.items():
                steered.setdefault(site, []).append(samples)
        loss = _loss(trained, steered, step)
        loss.backward()
        optimiser.step()
        _update_bounds(trained, arriving, rule)
        if progress is not None:
            progress(step, settings.steps, float(loss.detach()))
    return {"start": start, "fitted": _evaluate(hooks, trained, sources, arriving)}


def _evaluate(
    hooks: _Hooks,
    trained: dict[str, _Site],
    sources: list[Batch],
    arriving: dict[int, dict[str, torch.Tensor]],
) -> float:
    """The loss of the current maps over every source batch, without gradients; records in
    `arriving` the samples that reach each site (from which the next bounds come)."""
    steered: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for index, batch in enumerate(sources):
            parts, arriving[index] = hooks.run(batch, need_gradients=False)
            for site, samples in parts.items():
                steered.setdefault(site, []).append(samples)
        return float(_loss(trained, steered, 0))


def _loss(
    trained: dict[str, _Site], steered: dict[str, list[torch.Tensor]], step: int
) -> torch.Tensor:
    """The summed loss of the steered samples; an ActError when a site is missing or NaN."""
    missing = [site for site in trained if site not in steered]
    if missing:
        raise ModulesNeverRanError(
            f"modules {missing} never ran for the source batches; check the layer selection",
            missing,
        )
    loss = sum(trained[site].target.loss(torch.cat(parts)) for site, parts in steered.items())
    if not torch.isfinite(loss):
        where = f"at step {step}" if step else "on evaluation"
        raise ActError(
            f"the end-to-end loss became {float(loss.detach())} {where}; lower the learning "
            "rate or check the model's activations for NaN"
        )
    return loss


def _update_bounds(
    trained: dict[str, _Site], arriving: dict[int, dict[str, torch.Tensor]], rule: Support
) -> None:
    """Bound every site's map to the range of the latest samples arriving there."""
    if rule.level is None:
        return
    for site, state in trained.items():
        samples = torch.cat([parts[site] for parts in arriving.values() if site in parts])
        state.lo, state.hi = _bounds(samples, rule)


def _fitted_map(state: _Site, target: torch.Tensor, rule: Support) -> ModuleMap:
    """The trained map of one site with the bounds its last evaluation used."""
    target_lo, target_hi = _bounds(target, rule)
    return ModuleMap(
        state.omega.detach().clone(),
        state.beta.detach(),
        state.lo.clone(),
        state.hi.clone(),
        target_lo,
        target_hi,
    )
