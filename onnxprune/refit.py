"""One plan's sequential refit and its held-out guard: the refitted model is kept only where its
outputs on the held-out samples are at least as close to the original's as the one-shot fold's
(DESIGN §2, sequential recovery)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from .allocate import held_out_reference
from .calibrate import positions
from .decisions import SequentialResult
from .errors import failure_line
from .plan import Plan
from .preparation import Prepared
from .recovery import Recovery, fit_recoveries, shared_sites
from .rewrite import cache_io_changes, rewrite
from .sequential import SEQUENTIAL_SAMPLES, sequential_recoveries
from .stats import SiteStats
from .verify import optimisation_problem
from .weights import WeightsFile, offload

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class Refit:
    """The sequential branch's model: refitted if the guard kept it, else the one-shot fold;
    the pass's result (None if it failed, with `warnings` saying why) and the temporary file of
    a large kept refit."""

    model: onnx.ModelProto | None
    result: SequentialResult | None
    weights: WeightsFile | None = None
    warnings: list[str] = field(default_factory=list)  # why a refit was not kept or failed
    plan: Plan | None = None  # the plan the model realises (a kept refit's units where `rechoose` chose again)


Fits = tuple[dict[tuple[int, str], Recovery], dict[tuple[int, str], Recovery]]  # (the refit's prior, the one-shot fold)


def one_shot_fits(prepared: Prepared, plan: Plan, stats: dict[str, SiteStats], kind: str) -> Fits:
    """The one-shot recoveries a refit of `plan` starts from: each space's own columns (the
    refit's prior) and the fold the guard compares with (the same without shared sites); they
    read the Grams, which `refit_or_one_shot` then drops."""
    analysis = prepared.analysis
    prior = fit_recoveries(analysis, plan, stats, kind, within_space=True)
    return prior, fit_recoveries(analysis, plan, stats, kind) if shared_sites(analysis) else prior


def refit_or_one_shot(prepared: Prepared, plan: Plan, stats: dict[str, SiteStats], kind: str, one_shot_error: float | None,
                      progress: ProgressFactory | None, shrinkage: float | None, samples: int, rechoose: bool = False,
                      fits: Fits | None = None) -> Refit:
    """Fit one-shot (unless `fits` are given), refit sequentially, keep the refit if the held-out
    guard does (a pass that fails writes the one-shot model). Frees what the pass does not read as
    it goes: `stats` keep only their means, the refitted recoveries go once folded, a large refit
    waits on disk."""
    analysis, original, constants = prepared.analysis, prepared.original, prepared.index.constants
    prior, one_shot = fits or one_shot_fits(prepared, plan, stats, kind)
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
    return Refit(rewrite(original, analysis, plan, one_shot, constants), result, warnings=warnings, plan=plan)


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
        result, failure = None, failure_line(exc)
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
