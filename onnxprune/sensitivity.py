"""Measured allocation: how much each space's pruning costs at the model's output.

The global threshold compares spaces by the fraction of their *own* energy a cut loses; a space
whose errors the rest of the network amplifies (or damps) is treated like any other. Here every
space is pruned alone, once, to a probe depth with its least-squares recovery, and the model's
output error on a few calibration samples is measured against the original's; its gain (output
error per unit of normalised energy lost) rescales that space's energies, so one threshold
compares estimated end-to-end errors (docs/design.md, "Measured allocation")."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import TargetError
from .fidelity import ReferenceOutputs
from .plan import Plan, Planner, Target

PROBE_FRACTION = 0.3  # units removed by the probes when the target gives no budget (tolerance, latency)
PROBE_LIMITS = (0.05, 0.6)  # the probe budget follows the target's within these bounds
PROBE_SAMPLES_MAX = 64  # by default about four calibration passes in all, at least two samples, at most this


@dataclass
class Probe:
    """One space pruned alone: units kept, normalised energy lost, relative output error."""

    kept: int
    energy_lost: float
    output_error: float


@dataclass
class Sensitivity:
    """Per space, the gain that turns its normalised energy lost into an estimated output error."""

    gains: dict[int, float]
    probes: dict[int, Probe]
    samples: int
    seconds: float

    def summary(self, names: dict[int, str]) -> dict:
        """For the report: the probe of every space and the gain it gave."""
        rows = [{"space": names.get(sid, str(sid)), "gain": round(gain, 4)} for sid, gain in self.gains.items()]
        for row, sid in zip(rows, self.gains, strict=True):
            if sid in self.probes:
                probe = self.probes[sid]
                row.update(kept=probe.kept, energy_lost=round(probe.energy_lost, 6), output_error=float(f"{probe.output_error:.4g}"))
        return {"samples": self.samples, "seconds": round(self.seconds, 2), "spaces": rows}



def probe_target(target: Target) -> Target:
    """The budget the probes are cut to: the target's own where it has one, within PROBE_LIMITS."""
    if target.kind in ("ratio", "flops", "params"):
        return Target(target.kind, float(np.clip(target.value, *PROBE_LIMITS)))
    return Target("ratio", PROBE_FRACTION)


def probe_counts(planner: Planner, target: Target) -> dict[int, int]:
    """Units each probe keeps: the global threshold's counts for the probe budget, so that every
    probe loses about the same normalised energy (a unit fraction would probe a layer with many
    dead units at no energy at all and extrapolate from nothing); a space the threshold leaves
    whole is probed one --round-to step down."""
    try:
        threshold = planner.threshold_for(probe_target(target))
    except TargetError:  # the budget cannot be reached: the final plan will say so
        threshold = planner.threshold_for(Target("ratio", 0.0))
    counts = planner.kept_counts(threshold)
    for sid, tail in planner.tails.items():
        if counts[sid] >= len(tail):
            counts[sid] = max(planner.floors[sid], len(tail) - planner.steps[sid])
    return counts


def default_probe_samples(n_calib: int, n_spaces: int) -> int:
    """About four calibration passes in all over the probes, at least two samples each."""
    return min(PROBE_SAMPLES_MAX, max(2, math.ceil(4 * n_calib / max(n_spaces, 1))))


def measure_sensitivity(
    planner: Planner,
    target: Target,
    reference: ReferenceOutputs,
    build: Callable[[Plan], onnx.ModelProto],
    io_changes: Callable[[Plan], dict[str, tuple[int, np.ndarray]]],
    progress: Callable[[int], None] | None = None,
) -> Sensitivity:
    """Prune every space of `planner` alone to the probe depth (`build` rewrites a plan with its
    recovery) and measure the output error against `reference` (calibration samples)."""
    start = time.perf_counter()
    counts = probe_counts(planner, target)
    full = {sid: len(tail) for sid, tail in planner.tails.items()}
    probes: dict[int, Probe] = {}
    for sid, tail in planner.tails.items():
        if counts[sid] < len(tail):
            plan = planner.plan_at(float("nan"), target, {**full, sid: counts[sid]})
            error = reference.error(build(plan), io_changes(plan))
            probes[sid] = Probe(counts[sid], float(planner.scores[sid].tail_fraction()[counts[sid]]), error)
        if progress is not None:
            progress(1)
    return Sensitivity(gains_from(probes, full), probes, reference.samples, time.perf_counter() - start)


GAIN_LIMITS = (1e-2, 1e2)  # relative to the median: one probe is extrapolated no further than this
ENERGY_MIN = 1e-6  # a probe that lost less normalised energy measures noise, not a gain


def gains_from(probes: dict[int, Probe], spaces: dict[int, int]) -> dict[int, float]:
    """Output error per unit of normalised energy lost, per space, relative to the median space;
    spaces without a usable probe (nothing removable, or no energy lost) take the median."""
    measured = {sid: p.output_error / p.energy_lost for sid, p in probes.items() if p.energy_lost > ENERGY_MIN}
    median = float(np.median(list(measured.values()))) if measured else 1.0
    median = median if median > 0 else 1.0
    return {sid: float(np.clip(measured.get(sid, median) / median, *GAIN_LIMITS)) for sid in spaces}
