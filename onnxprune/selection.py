"""The `auto` allocation: which per-layer allocation suits this model is measured, not assumed.

No single rule won on every benchmark model: one global threshold on the normalised energies is
best on MobileNetV2 / EfficientNet-Lite0 and collapses the Fashion-MNIST CNNs at 70% of the MACs,
the same fraction everywhere does the opposite (docs/benchmark.md). So every candidate's plan is
rewritten with its one-shot recovery and the one whose outputs are closest to the original's on
the held-out samples (KL divergence of logits, relative L2 of other outputs) is chosen."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import TargetError
from .fidelity import ReferenceOutputs
from .plan import Plan, Planner, Target
from .streams import StreamGains

AUTO_CANDIDATES = ("global", "stream", "tempered", "uniform")
CHOICE_SAMPLES = 64  # held-out samples each candidate is scored on, at most


@dataclass
class AllocationChoice:
    """The chosen allocation and every candidate's held-out output error (None: it cannot meet
    the target)."""

    chosen: str
    errors: dict[str, float | None]
    samples: int
    seconds: float
    streams: StreamGains | None = None  # the stream candidate's measured gains

    def summary(self, names: dict[int, str] | None = None) -> dict:
        errors = {name: None if e is None else float(f"{e:.4g}") for name, e in self.errors.items()}
        summary = {"chosen": self.chosen, "heldout_error": errors, "samples": self.samples, "seconds": round(self.seconds, 2)}
        if self.streams is not None:
            summary["stream"] = self.streams.summary(names or {})
        return summary


def choose_allocation(
    planners: dict[str, Planner],
    target: Target,
    reference: ReferenceOutputs,
    build: Callable[[Plan], onnx.ModelProto],
    io_changes: Callable[[Plan], dict[str, tuple[int, np.ndarray]]],
    progress: Callable[[int], None] | None = None,
) -> AllocationChoice:
    """Plan the target with every candidate planner, score each distinct plan once on
    `reference`, and choose the lowest error (the first candidate on ties)."""
    start = time.perf_counter()
    errors: dict[str, float | None] = {}
    seen: dict[tuple, float] = {}
    refusals: list[TargetError] = []
    for name, planner in planners.items():
        try:
            plan = planner.plan(target)
        except TargetError as exc:
            errors[name] = None
            refusals.append(exc)
        else:
            key = tuple(sorted((sid, tuple(p.keep)) for sid, p in plan.spaces.items()))
            if key not in seen:
                seen[key] = reference.error(build(plan), io_changes(plan))
            errors[name] = seen[key]
        if progress is not None:
            progress(1)
    scored = {name: e for name, e in errors.items() if e is not None}
    if not scored:
        raise refusals[0]
    chosen = min(scored, key=lambda name: (scored[name], list(planners).index(name)))
    return AllocationChoice(chosen, errors, reference.samples, time.perf_counter() - start)
