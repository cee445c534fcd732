"""Latency targets: search the global threshold by timing the rewritten model in onnxruntime.

MACs do not predict CPU latency well (per-op overheads, memory-bound depthwise convs and
activations, kernels that prefer some channel counts), so `--latency F` measures instead of
modelling: every step of a bisection over the planner's thresholds rewrites the model and
times it against the original, interleaved so that machine drift cancels."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import make_session
from .errors import TargetError
from .plan import Plan, Planner, Target

STEP_TOLERANCE = 0.01  # stop when the MACs removed by the bracketing plans differ by less than this
TIMING_SECONDS = 0.4  # per model and round of one measurement


@dataclass
class LatencyResult:
    """What the search measured: the chosen plan's latency / the original's, and its steps."""

    batch: int
    threads: int
    ratio: float
    steps: list[tuple[float, float]]  # (MACs removed, measured latency ratio) per step


def _median_seconds(session: ort.InferenceSession, feeds: dict[str, np.ndarray], budget: float) -> float:
    session.run(None, feeds)
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget and len(times) < 200):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def latency_ratio(original: ort.InferenceSession, candidate: ort.InferenceSession, feeds: dict[str, np.ndarray],
                  candidate_feeds: dict[str, np.ndarray] | None = None, rounds: int = 5) -> float:
    """Median over interleaved rounds of (candidate latency / original latency)."""
    candidate_feeds = feeds if candidate_feeds is None else candidate_feeds
    ratios = []
    for _ in range(rounds):
        base = _median_seconds(original, feeds, TIMING_SECONDS)
        ratios.append(_median_seconds(candidate, candidate_feeds, TIMING_SECONDS) / base)
    return float(np.median(ratios))


def max_steps(planner: Planner) -> int:
    """Candidates a search times at most (for progress bars)."""
    return int(np.ceil(np.log2(max(len(planner.thresholds()), 2)))) + 1


def search_latency(
    planner: Planner,
    target: Target,
    original: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    build: Callable[[Plan], tuple[onnx.ModelProto, dict[str, np.ndarray]]],
    threads: int,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Plan, onnx.ModelProto, LatencyResult]:
    """The plan with the fewest units removed whose rewritten model meets latency ratio
    <= 1 - target.value, by bisection over the planner's thresholds (latency is monotone in
    them up to timing noise). `build(plan)` returns the pruned model and its feeds."""
    wanted = 1 - target.value
    reference = make_session(original, threads=threads, timing=True)
    candidates = planner.thresholds()
    steps: list[tuple[float, float]] = []
    cache: dict[int, tuple[Plan, onnx.ModelProto, float]] = {}

    def measure(index: int) -> tuple[Plan, onnx.ModelProto, float]:
        if index not in cache:
            plan = planner.plan_at(float(candidates[index]), target)
            model, pruned_feeds = build(plan)
            ratio = latency_ratio(reference, make_session(model, threads=threads, timing=True, rewritten=True), feeds, pruned_feeds)
            steps.append((round(planner.removed("flops", float(candidates[index])), 4), round(ratio, 4)))
            cache[index] = (plan, model, ratio)
            if on_step is not None:
                on_step(1)
        return cache[index]

    lo, hi = 0, len(candidates) - 1
    if measure(hi)[2] > wanted:
        best = measure(hi)[2]
        raise TargetError(f"--latency {target.value:g} cannot be reached: removing everything prunable leaves "
                          f"{best:.0%} of the original latency (pinned spaces, --min-keep and --round-to limit it)")
    while lo < hi and planner.removed("flops", float(candidates[hi])) - planner.removed("flops", float(candidates[lo])) > STEP_TOLERANCE:
        mid = (lo + hi) // 2
        if measure(mid)[2] <= wanted:
            hi = mid
        else:
            lo = mid + 1
    plan, model, ratio = measure(hi)
    return plan, model, LatencyResult(next(iter(feeds.values())).shape[0], threads, ratio, steps)
