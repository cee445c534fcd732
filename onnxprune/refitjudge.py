"""Auto's one-shot choice against the uniform plan, judged after both are refitted.

Auto scores its candidates on their one-shot models, but under the sequential fit the model
written is a refit, and at high ratios the refit reorders them: the one-shot error penalises
the compounding that the refit undoes, so on the Fashion-MNIST CNNs at 70% of the MACs uniform
ratios were best after the refit where the one-shot models ranked them behind (docs/benchmark.md,
"Judging after the refit"). So the chosen plan and the uniform one are both refitted, and the
model whose outputs are closer to the original's on calibration samples and the held-out ones
is kept. The calibration samples are ones the pass left out where there are enough; else its
own, whose error favours the plan with more regressors where rows are few, a bias measured
smaller than the one-shot ranking's error. The held-out samples alone (51 on that benchmark)
were too few to rank the refits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .allocate import held_out_reference
from .errors import failure_line
from .fidelity import ReferenceOutputs
from .plan import Plan
from .preparation import Prepared
from .refit import ProgressFactory, Refit, one_shot_fits, refit_or_one_shot, sequential_batch_size
from .rewrite import cache_io_changes
from .stats import SiteStats

JUDGE_SAMPLES = 512  # calibration samples the refitted models are compared on, at most (besides the held-out ones)
JUDGE_BYTES = 256 << 20  # their inputs, held in memory through both refits, at most
UNFITTED_ENOUGH = JUDGE_SAMPLES // 2  # samples the pass left out that make the comparison out-of-sample


@dataclass
class Judgement:
    """Each finalist's output error after its refit, on how many samples, and how long it took."""

    errors: dict[str, float]
    samples: int
    seconds: float
    calibration: str  # "unfitted": the calibration samples compared on are not the refit's own; "fitted": they are
    failed: dict[str, str] = field(default_factory=dict)  # finalists whose refit could not be made or run, and why

    def summary(self) -> dict:
        summary = {"errors": {name: float(f"{e:.4g}") for name, e in self.errors.items() if name not in self.failed},
                   "samples": self.samples, "calibration": self.calibration, "seconds": round(self.seconds, 2)}
        if self.failed:
            summary["failed"] = dict(self.failed)
        return summary

    def warnings(self) -> list[str]:
        return [f"the refit of allocation finalist '{name}' failed and lost the comparison: {why}" for name, why in self.failed.items()]


class RefitError:
    """A refitted model's output error on calibration samples and on the held-out samples, the
    mean over both weighted by their counts. The calibration samples are those the pass does not
    refit on where it leaves out UNFITTED_ENOUGH of them (a larger calibration set than
    `samples`), else the first ones, which it fits (`kind` says which). The same samples every
    call; their inputs and the original's outputs are made for each call rather than kept
    through the passes (up to JUDGE_BYTES and 256 MB a part), as `refit.heldout_error` does."""

    def __init__(self, prepared: Prepared, samples: int):
        self.prepared, self.pass_samples = prepared, samples
        self.samples, self.kind = 0, "fitted"

    def _references(self) -> list[ReferenceOutputs]:
        prepared = self.prepared
        limit = max(1, min(JUDGE_SAMPLES, JUDGE_BYTES // max(prepared.calib_data.sample_bytes, 1)))
        unfitted = prepared.calib_data.outside_spread(self.pass_samples, sequential_batch_size(prepared), limit, min(UNFITTED_ENOUGH, limit))
        self.kind = "fitted" if unfitted is None else "unfitted"
        parts = [ReferenceOutputs(prepared.original, prepared.calib_data if unfitted is None else unfitted, prepared.batch_size, limit)]
        if prepared.verify_data.n_samples:
            parts.append(held_out_reference(prepared))
        return parts

    def __call__(self, refit: Refit) -> float:
        parts = self._references()
        self.samples = sum(part.samples for part in parts)
        changes = cache_io_changes(self.prepared.analysis, refit.plan)
        return sum(part.error(refit.model, changes) * part.samples for part in parts) / self.samples


def judge_refits(prepared: Prepared, plans: dict[str, Plan], one_shot_errors: dict[str, float], stats: dict[str, SiteStats],
                 kind: str, progress: ProgressFactory | None, shrinkage: float | None, samples: int,
                 rechoose: bool) -> tuple[str, Refit, Judgement]:
    """Refit every plan in `plans` (the first is auto's choice, kept on ties), keep the refit with
    the lowest `RefitError`; the others' temporary files are closed as soon as they lose. A
    finalist whose refit cannot be made or run is named in `Judgement.failed` and loses; a
    failure of the first one's pass is raised, as without a judge."""
    start = time.perf_counter()
    fits = {name: one_shot_fits(prepared, plan, stats, kind) for name, plan in plans.items()}  # before a refit drops the Grams
    judge = RefitError(prepared, samples)
    errors: dict[str, float] = {}
    failed: dict[str, str] = {}
    best: tuple[str, Refit] | None = None
    for name, plan in plans.items():
        named = None if progress is None else _named(progress, name)
        try:
            refit = refit_or_one_shot(prepared, plan, stats, kind, one_shot_errors[name], named, shrinkage, samples, rechoose,
                                      fits.pop(name))
        except Exception as exc:  # noqa: BLE001 - a rival that cannot be refitted loses; the chosen plan's failure ends the run as before
            if best is None:
                raise
            failed[name] = failure_line(exc)
            continue
        try:
            errors[name] = judge(refit)
        except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run loses the comparison, not the run
            failed[name], errors[name] = failure_line(exc), float("inf")
        if best is None or errors[name] < errors[best[0]]:
            best, refit = (name, refit), best[1] if best else None
        if refit is not None and refit.weights is not None:  # the loser's temporary file
            refit.weights.close()
    return best[0], best[1], Judgement(errors, judge.samples, time.perf_counter() - start, judge.kind, failed)


def _named(progress: ProgressFactory, name: str) -> ProgressFactory:
    """Progress bars that say which finalist's refit they count."""
    return lambda description, total: progress(f"{description} ({name})", total)
