"""The pipeline: load -> analyse -> calibrate -> score -> plan -> rewrite -> verify/report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .allocate import allocation_planner, attention_spaces, has_attention
from .analyse import Analysis
from .cost import CostModel, build_cost_model, count_macs, count_params
from .data import CalibrationData
from .decisions import SequentialResult
from .errors import CalibrationError, TargetError
from .graph import GraphIndex, static_shapes
from .latency import max_steps, search_latency
from .load import release_memory
from .plan import ALLOCATIONS, DEFAULT_ALLOCATION, Plan, Target, misaligned_warning, overshoot_warning
from .preparation import Prepared, calibration_statistics, prepare, prepare_options
from .recovery import fit_recoveries
from .refit import Refit, refit_or_one_shot
from .refitjudge import judge_refits
from .report import PruneReport, SpaceRow
from .rewrite import cache_io_changes, pruned_spaces, rewrite
from .score import DEFAULT_ORDER, METHODS, ORDERS, RECOVERY, STATS_METHODS, score_space
from .selection import REFIT_RIVAL, AllocationChoice
from .sensitivity import Sensitivity
from .sequential import SEQUENTIAL_SAMPLES
from .shards import Statistics
from .sources import ImageOptions
from .stats import SiteStats
from .streams import StreamGains
from .tidy import restore_fp16_weights
from .undersampled import pin_undersampled, undersampled_hint
from .verify import drop_units, far_outputs_warning, verify
from .weights import offload, with_weights_in_memory

DEFAULT_TOLERANCE = 0.01
JUDGES = ("refit", "one-shot")  # how auto's choice is judged under the sequential fit (`refitjudge`)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class PruneResult:
    """The pruned model and the report; unpacks as `model, report = prune(...)`."""

    model: onnx.ModelProto
    report: PruneReport

    def __iter__(self) -> Iterator:
        return iter((self.model, self.report))


DEFAULT_FIT = "auto"  # sequential recovery for models without attention heads (resolve_fit)


def resolve_target(ratio: float | None, flops: float | None, params: float | None, tolerance: float | None,
                   latency: float | None = None) -> Target:
    """Exactly one target; none given means --tolerance DEFAULT_TOLERANCE."""
    given = {k: v for k, v in (("ratio", ratio), ("flops", flops), ("params", params), ("tolerance", tolerance), ("latency", latency))
             if v is not None}
    if len(given) > 1:
        raise TargetError(f"give one target, not {' and '.join('--' + k for k in given)}")
    if not given:
        return Target("tolerance", DEFAULT_TOLERANCE)
    kind, value = given.popitem()
    return Target(kind, float(value))


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda advance: None


@contextmanager
def _stage(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def prune(
    model: str | Path | onnx.ModelProto,
    calib: str | Path | dict[str, np.ndarray] | CalibrationData,
    *,
    ratio: float | None = None,
    flops: float | None = None,
    params: float | None = None,
    tolerance: float | None = None,
    method: str = "snp",
    order: str = DEFAULT_ORDER,
    round_to: int = 1,
    min_keep: float = 1,
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = 32,
    verify_samples: int | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
    image_options: ImageOptions | None = None,
    calib_samples: int | None = None,
    statistics: Statistics | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    spatial_stride: int | str = "auto",
    latency: float | None = None,
    latency_batch: int = 1,
    latency_threads: int = 0,
    sequential: bool | str = DEFAULT_FIT,
    shrinkage: float | str = "auto",
    allocation: str = DEFAULT_ALLOCATION,
    sensitivity_samples: int | None = None,
    head_gain: float | None = None,
    sequential_samples: int = SEQUENTIAL_SAMPLES,
    rechoose: bool = True,
    report_samples: int = 0,
    judge: str = "refit",
) -> PruneResult:
    """Prune `model` with calibration data `calib`; returns the pruned ModelProto and a report.

    Targets (one of them): `ratio` / `flops` / `params` = fraction of prunable units / MACs /
    parameters to REMOVE; `tolerance` = largest normalised energy loss of a removed unit under the
    allocation's rule (with "auto": under the global rule, which sets the MACs auto's choice removes).
    `calib`: a .npz/.npy path, a folder of images (see `image_options`), a `loader.py:function`
    hook yielding {input name: array} batches, or a dict of arrays (samples on axis 0).
    `statistics`: precomputed (merged) calibration statistics from `onnxprune.shards`; `workers`
    > 1 computes them in local processes, `scheduler` on a Dask cluster ("local" or an address).
    `spatial_stride`: sample every s-th row and column of conv feature maps for the statistics;
    "auto" only where the Gram work would exceed a quarter of the model's MACs.
    `latency`: fraction of the onnxruntime CPU latency to REMOVE, measured on this machine with
    `latency_batch` samples and `latency_threads` threads (0: onnxruntime's default) by timing
    the rewritten model at every step of a search over the threshold.
    `sequential`: refit every site's recovery on the model as already pruned upstream, against
    the original's activations ("auto", the default: for models without attention heads, i.e.
    conv nets, CRNNs and MLPs, where it was measured better with calibration data like the test
    data; transformers are fitted one-shot, where it measured no better at about 3x the time),
    with the shrinkage toward the one-shot fit chosen per site on the held-out samples (DESIGN §2; `shrinkage` a number fixes it: 0 is the plain cross-moment
    least squares, inf the one-shot fold itself); the keep sets are the one-shot plan's.
    `rechoose`: with the sequential refit, choose each space's units again (same counts) on the
    model as pruned upstream where the pass sees all of them and the new fit's held-out error is
    lower; the plan ranked them on the unpruned model (default on, measured better on the CNN
    and OCR benchmarks; docs/design.md, "Re-choosing kept units").
    `sequential_samples`: calibration samples the sequential pass refits on, spread over the set
    (default 512: the refit, a correction shrunk toward the one-shot fit, saturates well before
    the statistics do, docs/speed.md; 0 = all of them).
    `allocation`: "auto" (default: each of "global", "stream", "tempered" and "uniform" plans the
    target, the one whose one-shot model's outputs are closest to the original's on the held-out
    samples is kept; a latency target compares them at the same fraction of the MACs, a tolerance
    at the MACs the global threshold removes at it, and the chosen rule plans that), "global" (one threshold on the
    normalised energies of every space, DESIGN §2), "stream" (the same, each space's energies
    scaled by its consumers' share of the residual stream they join), "uniform" (the same fraction of every
    space's units), "tempered" (in between) or "sensitivity" (every space pruned alone first and
    its output error measured on `sensitivity_samples` calibration samples, default automatic;
    the energies are rescaled by it before one threshold). docs/design.md has the measurements.
    `head_gain`: multiplies the attention heads' scores before any allocation:
    above 1 keeps more heads and removes more FFN neurons or channels for the same target, below
    1 the reverse (per-kind budgets; grouped Conv groups are not heads). Default (None): 4,
    measured better than 1 under every rule on MiniLM and SmolLM2, and the auto allocation also
    tries its chosen rule with 2 and 8 where heads share the budget with other units, keeping
    the lowest held-out error (the best gain moved with the model and target,
    docs/transformers.md).
    With `sequential`, the refitted model is kept only if its held-out output error is no higher
    than the one-shot model's (the report says which).
    `judge`: with the auto allocation and the sequential fit, "refit" (default) also refits the
    uniform plan where auto chose another rule, and keeps the refit whose outputs are closer to
    the original's on the calibration and held-out samples (those the pass did not refit on where
    it leaves out enough; one more sequential pass; the refit
    reorders the candidates at high ratios, docs/benchmark.md); "one-shot" keeps auto's choice.
    `report_samples`: the last N calibration samples are held out for the report's fidelity
    alone; by default it is measured on the held-out samples that also chose the allocation,
    the shrinkage and the refit, which makes it optimistic on new data.
    Models of 64 MiB and more keep their weights on disk (their external-data files, or one
    temporary file) and fix glibc's mmap threshold for the process (`load.map_large_allocations`).
    """
    check_options(method, allocation, order, batch_size, latency_batch, sensitivity_samples, head_gain, sequential_samples, sequential,
                  judge)
    target = resolve_target(ratio, flops, params, tolerance, latency)
    fixed_shrinkage = resolve_shrinkage(shrinkage)
    progress = progress or _no_progress
    seconds: dict[str, float] = {}
    warnings: list[str] = []

    with _stage(seconds, "load"):
        prepared = prepare(model, calib, exclude, batch_size, verify_samples, image_options, calib_samples, spatial_stride, report_samples)
    warnings.extend(prepared.warnings)
    analysis, index = prepared.analysis, prepared.index
    fit = resolve_fit(sequential, method, analysis, index)
    stats: dict[str, SiteStats] = {}
    strides = prepared.subsampled
    if method in STATS_METHODS:
        with _stage(seconds, "calibrate"):
            if workers > 1 or scheduler:
                from .shards import collect_sharded

                options = prepare_options(exclude, batch_size, verify_samples, image_options, calib_samples, spatial_stride, report_samples)
                statistics = collect_sharded(model, calib, max(workers, 1), scheduler, options)
            stats, strides = _statistics(prepared, statistics, progress)
            statistics = None  # gathered: its Grams go when the sequential pass drops them from `stats`
        warnings.extend(pin_undersampled(analysis, stats))
        _check_prunable(prepared, stats)
    with _stage(seconds, "analyse"):
        cost = build_cost_model(index, analysis, recovery=method in RECOVERY)
    with _stage(seconds, "score"):
        scores = {s.id: score_space(s, stats, index, method, order, seed) for s in analysis.prunable}
    with _stage(seconds, "plan"), undersampled_hint(analysis):
        planner, allocated = allocation_planner(allocation, target, prepared, scores, cost, stats, method, min_keep, round_to,
                                                 sensitivity_samples, progress, head_gain)
    if isinstance(allocated, AllocationChoice):
        warnings.extend(allocated.warnings())
    builder = ModelBuilder(prepared, stats, method, fit["mode"] == "sequential", allocated, progress, fixed_shrinkage,
                           sequential_samples, rechoose)
    latency_result = None
    if target.kind == "latency":
        with _stage(seconds, "plan"):
            plan, pruned, latency_result = _latency_plan(planner, target, builder, latency_batch, latency_threads, progress)
        with _stage(seconds, "rewrite"):
            pruned = builder.final(plan, pruned)
    else:
        with _stage(seconds, "plan"), undersampled_hint(analysis):
            plan = planner.plan(allocated.planned_at if isinstance(allocated, AllocationChoice) and allocated.planned_at else target)
        warnings.extend(overshoot_warning(planner, plan, round_to))
        with _stage(seconds, "rewrite"):
            rival = allocated.rival() if judge == "refit" and isinstance(allocated, AllocationChoice) else None
            pruned = builder.final(plan, rival=rival)
    refit = builder.refit
    restore_fp16_weights(pruned)  # the weights the model stores as fp16 + Cast stay so
    warnings.extend(builder.warnings)
    if refit is not None and refit.plan is not None:
        plan = refit.plan  # the same counts, other units where the pass chose again (or the rival's plan)
    warnings.extend(misaligned_warning(analysis, plan))
    sampled = strides if stats else {}
    stats, scores = {}, {}  # what verification does not need goes before its sessions start
    builder.stats = {}
    index.constants.forget()
    pruned, pruned_weights = offload(pruned)  # a large result waits on disk while it is verified
    release_memory(prepared.original)
    io_changes = cache_io_changes(analysis, plan)
    with _stage(seconds, "verify"):
        fidelity = _verify(prepared, pruned, io_changes, progress)

    report = _build_report(prepared.name, method, order, target, plan, analysis, cost, prepared.original, pruned, prepared.data,
                           prepared.calib_data, prepared.fidelity_data, fidelity)
    report.fidelity_independent = prepared.report_data is not None
    report.warnings, report.seconds = list(dict.fromkeys(warnings + far_outputs_warning(fidelity))), seconds
    report.io_changes = _io_shapes(pruned, io_changes)
    report.spatial_strides = sampled
    _add_fit_notes(report, fit["mode"] == "sequential", method in RECOVERY, refit.result if refit else None, latency_result)
    report.fit = fit
    _add_allocation_notes(report, allocated, {s.id: s.name for s in analysis.spaces})
    pruned = with_weights_in_memory(pruned)
    for weights in (prepared.weights, pruned_weights, refit.weights if refit else None):
        if weights is not None:
            weights.close()
    return PruneResult(pruned, report)


def _statistics(prepared: Prepared, statistics: Statistics | None, progress: ProgressFactory) -> tuple[dict[str, SiteStats], dict[str, int]]:
    """The calibration statistics (gathered from shards when given) and the spatial strides they used."""
    if statistics is not None:
        stats, strides = statistics.for_model(prepared), statistics.strides
    else:
        stats, strides = calibration_statistics(prepared, progress=progress), prepared.subsampled
    release_memory(prepared.original)  # the calibration session is gone
    return stats, strides


def _check_prunable(prepared: Prepared, stats: dict[str, SiteStats]) -> None:
    """A clear error when undersampled sites left nothing to prune."""
    analysis = prepared.analysis
    if not analysis.prunable:
        needed = max(space.tensors[t].size + 1 for space in analysis.spaces for t in space.sites if t in stats)
        raise CalibrationError(
            f"nothing can be pruned with {prepared.calib_data.n_samples} calibration samples: every space saw fewer rows "
            f"than it has units (up to {needed} rows needed); give more samples"
        )


class ModelBuilder:
    """Plans become models: `build` folds the one-shot recoveries (what the planners compare),
    `final` refits sequentially when asked (and the method recovers), keeping the pass's `refit`."""

    def __init__(self, prepared: Prepared, stats: dict[str, SiteStats], method: str, sequential: bool, allocated,
                 progress: ProgressFactory, shrinkage: float | None, samples: int, rechoose: bool):
        self.prepared, self.stats, self.method, self.allocated, self.progress = prepared, stats, method, allocated, progress
        self.sequential = sequential and method in RECOVERY
        self.shrinkage, self.samples, self.rechoose = shrinkage, samples, rechoose and method == "snp"
        self.refit: Refit | None = None
        self.warnings: list[str] = []

    def build(self, plan: Plan) -> onnx.ModelProto:
        analysis = self.prepared.analysis
        recoveries = fit_recoveries(analysis, plan, self.stats, RECOVERY[self.method]) if self.method in RECOVERY else None
        return rewrite(self.prepared.original, analysis, plan, recoveries, self.prepared.index.constants)

    def final(self, plan: Plan, pruned: onnx.ModelProto | None = None, rival: Plan | None = None) -> onnx.ModelProto:
        """The pruned model: refitted sequentially when asked, else `pruned` or `build(plan)`.
        With a `rival` plan (auto's REFIT_RIVAL), both are refitted and the better refit is kept
        (`refitjudge`); `self.refit.plan` is the plan the model realises."""
        if not self.sequential:
            return pruned if pruned is not None else self.build(plan)
        allocated, kind = self.allocated, RECOVERY[self.method]
        scored = allocated.errors[allocated.chosen] if isinstance(allocated, AllocationChoice) else None
        options = (self.progress, self.shrinkage, self.samples, self.rechoose)
        if rival is None:
            self.refit = refit_or_one_shot(self.prepared, plan, self.stats, kind, scored, *options)
        else:
            plans = {allocated.chosen: plan, REFIT_RIVAL: rival}
            chosen, self.refit, judgement = judge_refits(self.prepared, plans, {n: allocated.errors[n] for n in plans}, self.stats, kind,
                                                         *options)
            allocated.judged(chosen, judgement.summary())
            self.warnings.extend(judgement.warnings())
        self.warnings.extend(self.refit.warnings)
        model, self.refit.model = self.refit.model, None  # one reference only: verification offloads it
        return model


def _latency_plan(planner, target: Target, builder: ModelBuilder, latency_batch: int, latency_threads: int, progress: ProgressFactory):
    """The plan of a latency target, searched by timing the rewritten candidates against the original."""
    prepared = builder.prepared
    feeds = next(iter(prepared.calib_data.batches(prepared.batch_size if prepared.static_batch else latency_batch)))

    def build_with_feeds(plan: Plan) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        changes = cache_io_changes(prepared.analysis, plan)
        return builder.build(plan), {k: drop_units(v, changes.get(k)) for k, v in feeds.items()}

    advance = progress("timing candidates", max_steps(planner))
    return search_latency(planner, target, prepared.original, feeds, build_with_feeds, latency_threads, advance)


def _verify(prepared: Prepared, pruned: onnx.ModelProto, io_changes: dict, progress: ProgressFactory) -> list:
    """The pruned model's outputs against the original's on the held-out samples (`io_changes`:
    the KV caches that shrank)."""
    advance = progress("verifying", 1)
    fidelity = verify(prepared.original, pruned, prepared.fidelity_data, prepared.batch_size, io_changes)
    release_memory(prepared.original)
    advance(1)
    return fidelity


def _add_allocation_notes(report: PruneReport, allocated, names: dict[int, str]) -> None:
    """What the allocation measured: the sensitivities, auto's candidates or the stream gains."""
    if isinstance(allocated, Sensitivity):
        report.sensitivity = allocated.summary(names)
    elif isinstance(allocated, AllocationChoice):
        report.allocation = allocated.summary(names)
    elif isinstance(allocated, StreamGains):
        report.allocation = {"stream": allocated.summary(names)}


def check_options(method: str, allocation: str, order: str, batch_size: int, latency_batch: int,
                  sensitivity_samples: int | None = None, head_gain: float | None = None,
                  sequential_samples: int = SEQUENTIAL_SAMPLES, sequential: bool | str = False, judge: str = "refit") -> None:
    """One-line errors for option values no stage can use, before anything is loaded."""
    for name, value, choices in (("method", method, METHODS), ("allocation", allocation, ALLOCATIONS), ("order", order, ORDERS)):
        if value not in choices:
            raise TargetError(f"unknown {name} '{value}' (choose from {', '.join(choices)})")
    if batch_size < 1:
        raise TargetError(f"--batch-size must be >= 1, got {batch_size}")
    if latency_batch < 1:
        raise TargetError(f"--latency-batch must be >= 1, got {latency_batch}")
    if sensitivity_samples is not None and sensitivity_samples < 1:
        raise TargetError(f"--sensitivity-samples must be >= 1, got {sensitivity_samples}")
    if head_gain is not None and not (np.isfinite(head_gain) and head_gain > 0):
        raise TargetError(f"--head-gain must be a positive number, got {head_gain}")
    if judge not in JUDGES:
        raise TargetError(f"unknown judge '{judge}' (choose from {', '.join(JUDGES)})")
    if sequential not in (True, False, "auto"):
        raise TargetError(f"sequential must be True, False or 'auto', got {sequential!r}")
    if sequential_samples < 0:
        raise TargetError(f"--sequential-samples must be >= 0 (0: every calibration sample), got {sequential_samples}")


def resolve_fit(sequential: bool | str, method: str, analysis: Analysis, index: GraphIndex) -> dict:
    """One-shot or sequential recovery, and why: "auto" refits models without attention
    sequentially (docs/benchmark.md: better on the conv nets, the CRNN and ResNet with
    representative calibration data; on MiniLM and SmolLM2 no better at about 3x the time)."""
    if sequential != "auto":
        return {"mode": "sequential" if sequential else "one-shot", "auto": False}
    if method not in RECOVERY:  # nothing to refit: not a choice
        return {"mode": "one-shot", "auto": False}
    if has_attention(index):
        heads = len(attention_spaces(analysis, index))
        return {"mode": "one-shot", "auto": True,
                "reason": f"attention ({heads} prunable head spaces): transformers measured no better sequentially"}
    return {"mode": "sequential", "auto": True, "reason": "no attention"}


def _add_fit_notes(report: PruneReport, sequential: bool, recovers: bool, sequential_result: SequentialResult | None,
                   latency_result) -> None:
    """The sequential fit's summary (or why it did not run) and the measured latency."""
    if sequential_result is not None:
        report.sequential = sequential_result.summary()
    elif sequential and not recovers:
        report.warnings.append(f"--sequential refits recoveries; method '{report.method}' has none, so it was pruned one-shot")
    if latency_result is not None:
        report.latency = {"batch": latency_result.batch, "threads": latency_result.threads, "ratio": round(latency_result.ratio, 4),
                          "steps": latency_result.steps}


def resolve_shrinkage(shrinkage: float | str) -> float | None:
    """None for "auto" (chosen per site on held-out samples), else a fixed non-negative number."""
    if shrinkage == "auto":
        return None
    try:
        value = float(shrinkage)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise TargetError(f"--shrinkage must be 'auto' or a number >= 0, got {shrinkage!r}")
    return value


def _io_shapes(model: onnx.ModelProto, changes: dict) -> dict[str, list]:
    """New shapes of the graph inputs/outputs that shrank (KV caches)."""
    shapes = {}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in changes:
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
    return shapes


def _build_report(
    name: str,
    method: str,
    order: str,
    target: Target,
    plan: Plan,
    analysis: Analysis,
    cost: CostModel,
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: CalibrationData,
    calib_data: CalibrationData,
    verify_data: CalibrationData,
    fidelity: list,
) -> PruneReport:
    sample_shapes = data.sample_shapes()
    macs_before = count_macs(GraphIndex(original, static_shapes(original, sample_shapes)))
    macs_after = count_macs(GraphIndex(pruned, static_shapes(pruned, sample_shapes)))
    derived = {s.id: p for s, p in pruned_spaces(analysis, plan) if s.derived is not None}  # KV heads gone with their query heads
    fractions = {**plan.fractions(), **{sid: p.fraction for sid, p in derived.items()}}
    rows = []
    for space in analysis.spaces:
        space_plan = plan.spaces.get(space.id, derived.get(space.id))
        kept = len(space_plan.keep) if space_plan is not None else space.n
        terms = [t for p in space.producers for t in cost.node_terms(p)]
        rows.append(SpaceRow(
            space.name, list(space.producers), space.n, kept,
            int(sum(t.base for t in terms)), int(round(cost.evaluate(terms, fractions))),
            list(space.pinned), len(space.locked), list(space.lock_reasons), None if space.derived is None else space.derived.node,
        ))
    return PruneReport(
        model=name, method=method, order=order, target={target.kind: target.value}, threshold=plan.threshold,
        params_before=count_params(original), params_after=count_params(pruned),
        macs_before=macs_before, macs_after=macs_after,
        units_before=plan.units_total, units_after=plan.units_total - plan.units_removed,
        calibration_samples=calib_data.n_samples, verification_samples=verify_data.n_samples,
        spaces=rows, fidelity=fidelity,
    )
