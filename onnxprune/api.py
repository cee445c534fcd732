"""The pipeline: load -> analyse -> calibrate -> score -> plan -> rewrite -> verify/report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .allocate import allocation_planner, attention_spaces, has_attention, held_out_reference
from .analyse import Analysis
from .calibrate import positions
from .cost import CostModel, build_cost_model, count_macs, count_params
from .data import CalibrationData
from .decisions import SequentialResult
from .errors import CalibrationError, TargetError
from .graph import GraphIndex, static_shapes
from .latency import max_steps, search_latency
from .load import release_memory
from .plan import ALLOCATIONS, DEFAULT_ALLOCATION, Plan, Target, misaligned_warning, overshoot_warning
from .preparation import Prepared, calibration_statistics, prepare, prepare_options
from .recovery import Recovery, fit_recoveries, shared_sites
from .report import PruneReport, SpaceRow
from .rewrite import cache_io_changes, pruned_spaces, rewrite
from .score import DEFAULT_ORDER, METHODS, ORDERS, RECOVERY, STATS_METHODS, score_space
from .selection import AllocationChoice
from .sensitivity import Sensitivity
from .sequential import SEQUENTIAL_SAMPLES, sequential_recoveries
from .shards import Statistics
from .sources import ImageOptions
from .stats import SiteStats
from .streams import StreamGains
from .tidy import restore_fp16_weights
from .verify import drop_units, far_outputs_warning, optimisation_problem, verify
from .weights import WeightsFile, offload, with_weights_in_memory

DEFAULT_TOLERANCE = 0.01
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
) -> PruneResult:
    """Prune `model` with calibration data `calib`; returns the pruned ModelProto and a report.

    Targets (one of them): `ratio` / `flops` / `params` = fraction of prunable units / MACs /
    parameters to REMOVE; `tolerance` = largest normalised energy loss of a removed unit.
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
    samples is kept; a tolerance or latency target uses "global"), "global" (one threshold on the
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
    `report_samples`: the last N calibration samples are held out for the report's fidelity
    alone; by default it is measured on the held-out samples that also chose the allocation,
    the shrinkage and the refit, which makes it optimistic on new data.
    Models of 64 MiB and more keep their weights on disk (their external-data files, or one
    temporary file) and fix glibc's mmap threshold for the process (`load.map_large_allocations`).
    """
    check_options(method, allocation, order, batch_size, latency_batch, sensitivity_samples, head_gain, sequential_samples, sequential)
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
    with _stage(seconds, "plan"), _undersampled_hint(analysis):
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
        with _stage(seconds, "plan"), _undersampled_hint(analysis):
            plan = planner.plan(target)
        warnings.extend(overshoot_warning(planner, plan, round_to))
        with _stage(seconds, "rewrite"):
            pruned = builder.final(plan)
    refit = builder.refit
    restore_fp16_weights(pruned)  # the weights the model stores as fp16 + Cast stay so
    warnings.extend(builder.warnings)
    if refit is not None and refit.plan is not None:
        plan = refit.plan  # the same counts, other units where the pass chose again
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
    report.warnings, report.seconds = warnings + far_outputs_warning(fidelity), seconds
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

    def final(self, plan: Plan, pruned: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The pruned model: refitted sequentially when asked, else `pruned` or `build(plan)`."""
        if not self.sequential:
            return pruned if pruned is not None else self.build(plan)
        allocated = self.allocated
        scored = allocated.errors[allocated.chosen] if isinstance(allocated, AllocationChoice) else None
        self.refit = refit_or_one_shot(self.prepared, plan, self.stats, RECOVERY[self.method], scored, self.progress, self.shrinkage,
                                       self.samples, self.rechoose)
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
                  sequential_samples: int = SEQUENTIAL_SAMPLES, sequential: bool | str = False) -> None:
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


WELL_SAMPLED = 4  # rows per unit below which a site's statistics are flagged as noisy


def pin_undersampled(analysis: Analysis, stats: dict[str, SiteStats]) -> list[str]:
    """Pin spaces whose statistics cannot tell redundancy from missing data, warn on thin ones.

    With fewer rows than units, any unit beyond the rank looks exactly redundant (zero energy)
    only because it was not observed (e.g. a 1280-channel head after global pooling with 256
    images): such spaces are pinned, with the number of samples needed."""
    warnings = []
    for space in analysis.prunable:
        for tensor in space.sites:
            rows, width = stats[tensor].count, space.tensors[tensor].size
            if rows <= width:
                space.pinned.append(f"site '{tensor}' saw only {rows} rows for {width} units: give at least {width + 1} {UNDERSAMPLED}")
                warnings.append(f"space '{space.name}' is not pruned: its site '{tensor}' saw {rows} rows for {width} units; give more calibration samples")
                break
            if rows < WELL_SAMPLED * width:
                warnings.append(f"site '{tensor}' saw {rows} rows for {width} units: its statistics are noisy; more calibration samples help")
    return list(dict.fromkeys(warnings))  # a site shared by several spaces (a Concat, a channel shuffle) is named once


UNDERSAMPLED = "calibration rows (samples x positions) to prune it"  # the end of pin_undersampled's pin reason


@contextmanager
def _undersampled_hint(analysis: Analysis) -> Iterator[None]:
    """A target that cannot be reached also names the spaces left unpruned for too few
    calibration rows: more samples, not other options, is the way out there."""
    try:
        yield
    except TargetError as exc:
        starved = [s.name for s in analysis.spaces if any(r.endswith(UNDERSAMPLED) for r in s.pinned)]
        if not starved:
            raise
        raise TargetError(f"{exc}; {len(starved)} spaces saw too few calibration rows to be pruned (e.g. '{starved[0]}'): "
                          "give more calibration samples") from None


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


@dataclass
class Refit:
    """The sequential branch's model: refitted if the guard kept it, else the one-shot fold;
    the pass's result (None if it failed, with `warnings` saying why) and the temporary file of
    a large kept refit."""

    model: onnx.ModelProto | None
    result: SequentialResult | None
    weights: WeightsFile | None = None
    warnings: list[str] = field(default_factory=list)  # why a refit was not kept or failed
    plan: Plan | None = None  # the kept refit's plan where `rechoose` chose other units


def refit_or_one_shot(prepared: Prepared, plan: Plan, stats: dict[str, SiteStats], kind: str, one_shot_error: float | None,
                      progress: ProgressFactory | None, shrinkage: float | None, samples: int, rechoose: bool = False) -> Refit:
    """Fit one-shot, refit sequentially, keep the refit if the held-out guard does (a pass that
    fails writes the one-shot model). Frees what the pass does not read as it goes: `stats` keep
    only their means, the refitted recoveries go once folded, a large refit waits on disk."""
    analysis, original, constants = prepared.analysis, prepared.original, prepared.index.constants
    prior = fit_recoveries(analysis, plan, stats, kind, within_space=True)  # the refit's columns are each space's own
    one_shot = fit_recoveries(analysis, plan, stats, kind) if shared_sites(analysis) else prior  # the same without shared sites
    for tensor, site in stats.items():  # nothing after this fit reads the Grams
        stats[tensor] = site.without_gram()
    # scored before the pass (unless auto already did), so that the one-shot model and the refitted one are never in memory together
    one_shot_error = heldout_error(prepared, plan, one_shot) if one_shot_error is None else one_shot_error
    result, warnings, retried = None, [], None
    for again in ([True, False] if rechoose else [False]):  # units chosen again first, then the plan's if that is not kept
        refit, result, failure = _attempt_refit(prepared, plan, stats, kind, prior, progress, shrinkage, samples, again, one_shot_error)
        if result is not None:
            result.retried = retried
        if refit is not None:
            refit.warnings = warnings
            return refit
        if again and failure is None and not result.rechosen:
            break  # nothing was chosen again: a second pass would be the same
        if again and failure:  # a fault of the re-choosing path: worth a warning, the plain pass may still succeed
            warnings.append(f"the sequential refit with units chosen again failed ({failure}); refitted with the plan's units")
        elif again:
            errors = result.heldout_errors
            retried = ("the refit with units chosen again was not kept (" + (result.rejected or (
                f"held-out output error {errors[1]:.3g} vs {errors[0]:.3g} one-shot" if errors else "the held-out guard")) + "); refitted with the plan's units")
        elif failure:
            warnings.append(f"the sequential refit failed ({failure}); the one-shot fit was written")
    return Refit(rewrite(original, analysis, plan, one_shot, constants), result, warnings=warnings)


def _attempt_refit(prepared: Prepared, plan: Plan, stats: dict[str, SiteStats], kind: str, prior: dict, progress: ProgressFactory | None,
                   shrinkage: float | None, samples: int, rechoose: bool,
                   one_shot_error: float) -> tuple[Refit | None, SequentialResult | None, str | None]:
    """One sequential pass and its guard: (the kept refit or None, the pass's result, why the pass failed)."""
    analysis, original, constants = prepared.analysis, prepared.original, prepared.index.constants
    weights, result, failure = None, None, None
    try:
        result = fit_sequentially(prepared, plan, stats, kind, prior, progress, shrinkage, samples, rechoose)
        refitted = rewrite(original, analysis, result.plan, result.recoveries, constants)
        result.recoveries = {}  # folded: up to k x n floats per site, read by neither the guard nor the report
        result.spill.close()
        refitted, weights = offload(refitted)
        if better_than_one_shot(prepared, plan, refitted, result, one_shot_error):
            return Refit(refitted, result, weights, plan=result.plan), result, None
        del refitted
    except Exception as exc:  # noqa: BLE001 - the one-shot fold is correct without the refit; the caller says why it is written
        if result is not None:
            result.spill.close()
        result, failure = None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    if weights is not None:
        weights.close()
    return None, result, failure


def heldout_error(prepared: Prepared, plan: Plan, recoveries: dict[tuple[int, str], Recovery] | None) -> float:
    """The output error (`fidelity.OutputError`) on the held-out samples of `plan` folded with
    `recoveries` (a working copy: weights on disk stay there). The original's reference outputs
    are made here and again for the refitted model rather than kept (up to 256 MB) through the
    sequential pass."""
    reference, changes = held_out_reference(prepared), cache_io_changes(prepared.analysis, plan)
    # passed as a temporary: its rewritten weights go as soon as onnxruntime has its copy
    return reference.error(rewrite(prepared.original, prepared.analysis, plan, recoveries, prepared.index.constants, keep_on_disk=True), changes)


def better_than_one_shot(prepared: Prepared, plan: Plan, refitted: onnx.ModelProto, result: SequentialResult,
                         one_shot_error: float) -> bool:
    """Whether the sequentially refitted model's outputs are at least as close to the original's
    on the held-out samples as the one-shot fold's (its error measured before the pass, or by the
    auto allocation on the same samples); both errors go into `result`. Each site's shrinkage is
    chosen on the same samples, but a sum of per-site errors does not always predict the model's
    (SmolLM2's perplexity rose while every site improved)."""
    changes = cache_io_changes(prepared.analysis, plan)
    reference = held_out_reference(prepared)
    refitted_error = reference.error(refitted, changes)
    result.heldout_errors = (one_shot_error, refitted_error)
    if refitted_error > one_shot_error:
        return False
    # a refit with huge coefficients (few samples) can amplify onnxruntime's rounding: verification would refuse it
    result.rejected = optimisation_problem(prepared.original, refitted, reference.batches[0], reference.first_outputs, changes)
    return result.rejected is None


SEQUENTIAL_BATCH_BYTES = 256 << 20  # the largest site's activations of one batch, at most (unless a sample is bigger)


def sequential_batch_size(prepared: Prepared) -> int:
    """The batch of the sequential pass: the calibration batch, smaller where one batch of the
    largest site's activations would pass SEQUENTIAL_BATCH_BYTES (a 512x512 segmentation map):
    the pass holds both models' activations of a batch and their products' operands at once."""
    if prepared.static_batch:
        return prepared.batch_size
    sizes = [(positions(prepared.shapes[s.tensor], s.axis) or 0) * s.width for s in prepared.analysis.sites() if prepared.shapes.get(s.tensor)]
    per_sample = 4 * max(sizes, default=0)  # float32 elements
    return max(1, min(prepared.batch_size, SEQUENTIAL_BATCH_BYTES // max(per_sample, 1)))


HELDOUT_SHARE = 4  # the pass's held-out samples: at most a quarter of its refit samples (all of them when it refits on all)


def fit_sequentially(prepared: Prepared, plan: Plan, stats: dict[str, SiteStats], kind: str, one_shot: dict[tuple[int, str], Recovery],
                     progress: ProgressFactory | None = None, shrinkage: float | None = None,
                     samples: int = SEQUENTIAL_SAMPLES, rechoose: bool = False) -> SequentialResult:
    """The sequential refit of every site of `plan` over `samples` calibration samples spread
    over the set (0: all), the shrinkage and any new choice of units made on at most a
    HELDOUT_SHARE-th as many verification samples, spread alike (docs/speed.md)."""
    size = sequential_batch_size(prepared)

    def batches() -> Iterator[tuple[dict[str, np.ndarray], bool]]:
        yield from ((batch, False) for batch in prepared.calib_data.spread_batches(samples, size))
        if prepared.verify_data.n_samples:
            yield from ((batch, True) for batch in prepared.verify_data.spread_batches(-(-samples // HELDOUT_SHARE), size))

    return sequential_recoveries(prepared.original, prepared.analysis, plan, stats, prepared.index, prepared.shapes, prepared.strides,
                                 batches, kind, one_shot, progress, shrinkage,
                                 rechoose and prepared.verify_data.n_samples > 0)  # a new choice needs held-out rows


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
