"""The `auto` allocation: which per-layer allocation suits this model is measured, not assumed.

No single rule won on every benchmark model: one global threshold on the normalised energies is
best on MobileNetV2 / EfficientNet-Lite0 and collapses the Fashion-MNIST CNNs at 70% of the MACs,
the same fraction everywhere does the opposite (docs/benchmark.md). So every candidate's plan is
rewritten with its one-shot recovery and the one whose outputs are closest to the original's on
the held-out samples (KL divergence of logits, relative L2 of other outputs) is chosen."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import TargetError, failure_line
from .fidelity import ReferenceOutputs
from .plan import Plan, Planner, Target
from .streams import StreamGains

AUTO_CANDIDATES = ("global", "stream", "tempered", "uniform")
CHOICE_SAMPLES = 64  # held-out samples each candidate is scored on, at most
# under the sequential fit, the rule refitted beside auto's one-shot choice (refitjudge.py): after
# the refit it was best at 70% MACs where the one-shot models ranked it behind (docs/benchmark.md)
REFIT_RIVAL = "uniform"
# ...but only where its one-shot error is within this factor of the choice's: on 81 Fashion-MNIST
# cells the refit of a rival further behind won no accuracy on balance, and on the ImageNet models
# (1.8-5x behind) it never won; its pass was pure cost (docs/benchmark.md, "The rival's margin")
RIVAL_MARGIN = 1.5


@dataclass
class AllocationChoice:
    """The chosen allocation and every candidate's held-out output error (None: it cannot meet
    the target)."""

    chosen: str
    errors: dict[str, float | None]
    samples: int
    seconds: float
    streams: StreamGains | None = None  # the stream candidate's measured gains
    failed: dict[str, str] = field(default_factory=dict)  # candidates whose model could not be built or run, and why
    plans: dict[str, Plan] = field(default_factory=dict, repr=False)  # each scored candidate's plan
    refitted: dict | None = None  # the judgement after the refits (`refitjudge.Judgement.summary`), where one ran
    unjudged: str | None = None  # why REFIT_RIVAL was not refitted beside the choice, where it was asked for and not
    compared_at: str | None = None  # the target the candidates were compared at, where it is not the run's own (for the report)
    planned_at: Target | None = None  # that target, which the chosen rule then plans (a tolerance's stand-in)

    def rival(self) -> Plan | None:
        """The plan refitted beside the chosen one under the sequential fit: REFIT_RIVAL's, where
        auto chose another rule and REFIT_RIVAL met the target with other units, with a one-shot
        error within RIVAL_MARGIN of the choice's (`unjudged` then says why it is not)."""
        rival = self.plans.get(REFIT_RIVAL)
        if self.chosen.startswith(REFIT_RIVAL) or rival is None:  # `plans` holds only candidates with an error
            return None
        if _plan_key(rival) == _plan_key(self.plans[self.chosen]):
            return None
        ratio = self.errors[REFIT_RIVAL] / max(self.errors[self.chosen], np.finfo(float).tiny)
        if ratio > RIVAL_MARGIN:
            self.unjudged = f"{REFIT_RIVAL} not refitted: its one-shot error is {ratio:.3g}x the choice's (more than {RIVAL_MARGIN:g}x)"
            return None
        return rival

    def judged(self, chosen: str, summary: dict) -> None:
        """Record the judgement after the refits, which may change the choice."""
        self.chosen, self.refitted = chosen, summary

    def summary(self, names: dict[int, str] | None = None) -> dict:
        errors = {name: None if e is None else float(f"{e:.4g}") for name, e in self.errors.items()}
        summary = {"chosen": self.chosen, "heldout_error": errors, "samples": self.samples, "seconds": round(self.seconds, 2)}
        if self.streams is not None:
            summary["stream"] = self.streams.summary(names or {})
        if self.failed:
            summary["failed"] = dict(self.failed)
        if self.refitted is not None:
            summary["refitted"] = self.refitted
        if self.unjudged is not None:
            summary["unjudged"] = self.unjudged
        if self.compared_at is not None:
            summary["compared_at"] = self.compared_at
        return summary

    def warnings(self) -> list[str]:
        return [f"allocation candidate '{name}' failed and was skipped: {why}" for name, why in self.failed.items()]

    def extended(self, more: AllocationChoice) -> AllocationChoice:
        """This choice with `more` candidates scored on the same samples; ties keep the earlier."""
        errors = {**self.errors, **more.errors}
        chosen = _lowest(errors, list(errors))
        return AllocationChoice(chosen, errors, self.samples, self.seconds + more.seconds, self.streams, {**self.failed, **more.failed},
                                {**self.plans, **more.plans})


def _plan_key(plan: Plan) -> tuple:
    """What makes two plans the same model: every space's kept units."""
    return tuple(sorted((sid, tuple(p.keep)) for sid, p in plan.spaces.items()))


def _lowest(errors: dict[str, float | None], order: list[str]) -> str:
    scored = {name: e for name, e in errors.items() if e is not None}
    return min(scored, key=lambda name: (scored[name], order.index(name)))


def choose_allocation(
    planners: dict[str, Planner],
    target: Target,
    reference: ReferenceOutputs,
    build: Callable[[Plan], onnx.ModelProto],
    io_changes: Callable[[Plan], dict[str, tuple[int, np.ndarray]]],
    progress: Callable[[int], None] | None = None,
    seen: dict[tuple, float | None] | None = None,
) -> AllocationChoice:
    """Plan the target with every candidate planner, score each distinct plan once on
    `reference`, and choose the lowest error (the first candidate on ties). A candidate whose
    model cannot be built or run is skipped (and named) while another one works. `seen` keeps
    the distinct plans' errors for a later call (a plan another candidate made is not scored
    again)."""
    start = time.perf_counter()
    errors: dict[str, float | None] = {}
    seen = {} if seen is None else seen
    refusals: list[TargetError] = []
    failures: dict[str, Exception] = {}
    plans: dict[str, Plan] = {}
    for name, planner in planners.items():
        try:
            plan = planner.plan(target)
        except TargetError as exc:
            errors[name] = None
            refusals.append(exc)
        else:
            key = _plan_key(plan)
            if key not in seen:
                try:
                    seen[key] = reference.error(build(plan), io_changes(plan))
                except Exception as exc:  # noqa: BLE001 - one candidate's failure must not end the run while others work
                    failures[name] = exc
                    seen[key] = None
            errors[name] = seen[key]
            if errors[name] is not None:
                plans[name] = plan
        if progress is not None:
            progress(1)
    scored = {name: e for name, e in errors.items() if e is not None}
    if not scored:
        raise next(iter(failures.values())) if failures else refusals[0]
    chosen = _lowest(scored, list(planners))
    failed = {name: failure_line(exc) for name, exc in failures.items()}
    return AllocationChoice(chosen, errors, reference.samples, time.perf_counter() - start, failed=failed, plans=plans)
