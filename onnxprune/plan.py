"""Planning: one global threshold on normalised tail energies decides every space's kept units."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .analyse import Analysis, Space
from .cost import CostModel
from .errors import TargetError
from .score import SpaceScore

TARGET_KINDS = ("ratio", "flops", "params", "tolerance", "latency")


@dataclass(frozen=True)
class Target:
    """What to meet: fraction of prunable units / MACs / params / measured latency REMOVED, or an
    energy tolerance."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise TargetError(f"unknown target '{self.kind}' (expected one of {', '.join(TARGET_KINDS)})")
        if not math.isfinite(self.value) or not 0 <= self.value <= 1 or (self.kind != "tolerance" and self.value >= 1):
            upper = "1]" if self.kind == "tolerance" else "1)"
            raise TargetError(f"--{self.kind} must be in [0, {upper}, got {self.value}")


@dataclass
class SpacePlan:
    """Kept and pruned unit indices (ascending) of one space."""

    space_id: int
    n: int
    keep: np.ndarray
    prune: np.ndarray

    @property
    def fraction(self) -> float:
        return len(self.keep) / self.n


@dataclass
class Plan:
    """The keep-set of every prunable space and the threshold that produced it."""

    spaces: dict[int, SpacePlan]
    threshold: float
    target: Target

    def fractions(self) -> dict[int, float]:
        return {sid: p.fraction for sid, p in self.spaces.items()}

    @property
    def units_total(self) -> int:
        return sum(p.n for p in self.spaces.values())

    @property
    def units_removed(self) -> int:
        return sum(len(p.prune) for p in self.spaces.values())

    @property
    def is_empty(self) -> bool:
        return self.units_removed == 0


def pruned_spaces(analysis: Analysis, plan: Plan) -> list[tuple[Space, SpacePlan]]:
    """The prunable spaces that lose units under `plan`, with their plans, and the derived
    spaces (grouped-query KV heads) that lose units with them."""
    found = [(s, plan.spaces[s.id]) for s in analysis.prunable if s.id in plan.spaces and len(plan.spaces[s.id].prune)]
    return found + derived_plans(analysis.derived, found)


def derived_plans(derived: list[Space], pruned: list[tuple[Space, SpacePlan]]) -> list[tuple[Space, SpacePlan]]:
    """A `derived` space's unit goes when every position repeating it at the Gather's output is
    removed by the space there (`spaces.DerivedFrom`)."""
    found = []
    for space in derived:
        link = space.derived
        source = next(((s, p) for s, p in pruned if link.output in s.tensors), None)
        if source is None:
            continue
        gone = np.isin(np.arange(len(link.picks)), source[0].tensors[link.output].element_positions_of(source[1].prune))
        picks = np.asarray(link.picks)
        prune = np.array([u for u in range(space.n) if gone[picks == u].all()], dtype=np.int64)
        if len(prune):
            found.append((space, SpacePlan(space.id, space.n, np.setdiff1d(np.arange(space.n), prune), prune)))
    return found


def floor_units(n: int, min_keep: float) -> int:
    """Per-space floor: a count (>= 1) or, below 1, a fraction of the space's units."""
    wanted = math.ceil(min_keep * n) if min_keep < 1 else int(min_keep)
    return min(n, max(1, wanted))


def unit_width(space: Space) -> int:
    """Channels of one unit on its producers' outputs: an attention head's d_head, else 1."""
    return min((space.tensors[c.tensor].block for c in space.slices if c.node in space.producers and c.tensor in space.tensors), default=1)


ALIGNMENT = 8  # channel counts that onnxruntime's CPU kernels and GPU engines run at full speed


def agree(n: int, one: str, many: str) -> str:
    """The word that agrees with a count of `n`: 'keeps' / 'keep', 'its' / 'their'."""
    return one if n == 1 else many


def counted(n: int, noun: str) -> str:
    """'1 layer', '3 layers': a count for a warning line."""
    return f"{n} {agree(n, noun, noun + 's')}"


def misaligned_warning(analysis: Analysis, plan: Plan) -> list[str]:
    """A warning when pruning left channel counts that are not multiples of 8 where the original
    had them: such models can run slower than the original (docs/speed.md, --round-to 1)."""
    rows = [(space.name, len(p.keep), space.n) for space in analysis.prunable
            if (p := plan.spaces.get(space.id)) is not None and len(p.prune) and unit_width(space) == 1
            and space.n % ALIGNMENT == 0 and len(p.keep) % ALIGNMENT]
    if not rows:
        return []
    name, kept, n = rows[0]
    return [f"{counted(len(rows), 'layer')} {agree(len(rows), 'keeps', 'keep')} channel counts that are not multiples of {ALIGNMENT} (e.g. '{name}': {kept} of {n}); "
            f"onnxruntime's CPU kernels and GPU engines run such counts slowly and the pruned model can be slower than the "
            f"original: --round-to {ALIGNMENT} (the CLI's default; round_to={ALIGNMENT} in Python) keeps multiples of {ALIGNMENT}"]


def overshoot_warning(planner: Planner, plan: Plan, round_to: int) -> list[str]:
    """A warning when the plan removes far more than its ratio / flops / params target (over 1.5x
    and 5 points more): the kept counts move in whole steps, and a model with few prunable
    layers may have no step small enough."""
    kind, value = plan.target.kind, plan.target.value
    if kind not in ("ratio", "flops", "params") or not value:
        return []
    removed = planner.removed_with(kind, {sid: len(p.keep) for sid, p in plan.spaces.items() if sid in planner.tails})
    if removed <= max(1.5 * value, value + 0.05):
        return []
    what = {"ratio": "of the prunable units", "flops": "of the MACs", "params": "of the parameters"}[kind]
    hint = f"--round-to {round_to} keeps multiples of {round_to} channels; a smaller --round-to comes closer" if round_to > 1 else \
        "the prunable layers' units are few or wide (see the per-layer table)"
    return [f"the plan removes {removed:.1%} {what} for --{kind} {value:g}: no smaller step was left ({hint})"]


class Planner:
    """Maps a threshold to kept counts (floors and --round-to applied) and searches the target.

    --round-to counts channels: a space whose units are `widths[id]` channels wide (attention
    heads) keeps a multiple of round_to / gcd(round_to, width) units."""

    def __init__(self, scores: dict[int, SpaceScore], cost: CostModel, min_keep: float = 1, round_to: int = 1,
                 widths: dict[int, int] | None = None, analysis: Analysis | None = None):
        if round_to < 1:
            raise TargetError(f"--round-to must be >= 1, got {round_to}")
        if min_keep <= 0:
            raise TargetError(f"--min-keep must be > 0, got {min_keep}")
        self.scores = scores
        self.cost = cost
        widths = widths or {}
        self.steps = {sid: round_to // math.gcd(round_to, widths.get(sid, 1)) for sid in scores}
        self.tails = {sid: s.prune_scores() for sid, s in scores.items()}
        # locked units (always kept) come first in the order; the floor applies to the others
        self.floors = {sid: s.locked + floor_units(len(s.order) - s.locked, min_keep) if s.locked < len(s.order) else len(s.order)
                       for sid, s in scores.items()}
        # spaces whose units go with these spaces' (grouped-query KV heads): their savings count too
        self.derived = [] if analysis is None else analysis.derived
        self.sources = {s.id: s for s in (analysis.prunable if analysis is not None else [])
                        if s.id in scores and any(d.derived.output in s.tensors for d in self.derived)}

    def with_gains(self, gains: dict[int, float]) -> Planner:
        """Scale spaces' prune scores (gain > 1 protects a space, < 1 exposes it); in place."""
        for sid in self.tails:
            self.tails[sid] = self.tails[sid] * gains.get(sid, 1.0)
        return self

    def kept_counts(self, threshold: float) -> dict[int, int]:
        counts = {}
        for sid, tail in self.tails.items():
            counts[sid] = self.stepped(sid, int(np.count_nonzero(tail > threshold)))
        return counts

    def stepped(self, sid: int, kept: int) -> int:
        """`kept` raised to the space's floor and to whole --round-to steps, at most all its units."""
        kept = max(kept, self.floors[sid])
        return min(len(self.tails[sid]), math.ceil(kept / self.steps[sid]) * self.steps[sid])

    def removed(self, kind: str, threshold: float) -> float:
        """Fraction of units / MACs / params removed at this threshold."""
        return self.removed_with(kind, self.kept_counts(threshold))

    def removed_with(self, kind: str, counts: dict[int, int]) -> float:
        """Fraction of units / MACs / params removed with these kept counts."""
        if kind == "ratio":
            total = sum(len(t) for t in self.tails.values())
            return (total - sum(counts.values())) / total if total else 0.0
        fractions = {sid: counts[sid] / len(self.tails[sid]) for sid in counts}
        fractions.update(self.derived_fractions(counts))
        if kind == "flops":
            total = self.cost.total_macs
            return 1 - self.cost.macs(fractions) / total if total else 0.0
        total = self.cost.total_params
        return 1 - self.cost.params(fractions) / total if total else 0.0

    def derived_fractions(self, counts: dict[int, int]) -> dict[int, float]:
        """The kept fraction of every derived space (KV heads) when its source spaces keep the
        first `counts` units of their order."""
        if not self.derived:
            return {}
        pruned = [(space, self.space_plan(sid, counts[sid])) for sid, space in self.sources.items()
                  if counts.get(sid, len(self.scores[sid].order)) < len(self.scores[sid].order)]
        return {space.id: p.fraction for space, p in derived_plans(self.derived, pruned)}

    def space_plan(self, sid: int, kept: int) -> SpacePlan:
        """The first `kept` units of the space's order kept, the rest pruned (both ascending)."""
        order = self.scores[sid].order
        return SpacePlan(sid, len(order), np.sort(order[:kept]), np.sort(order[kept:]))

    def threshold_for(self, target: Target) -> float:
        if target.kind == "tolerance":
            return target.value
        if target.kind == "latency":
            raise TargetError("a latency target is met by measuring (onnxprune.latency.search_latency), not by the cost model")
        candidates = self.thresholds()
        if target.value == 0:
            return -np.inf
        best = self.removed(target.kind, float(candidates[-1]))
        if best < target.value:
            what = {"ratio": "prunable units", "flops": "MACs", "params": "parameters"}[target.kind]
            raise TargetError(
                f"--{target.kind} {target.value:g} cannot be reached: at most {best:.1%} of the {what} can be "
                "removed (pinned spaces, locked units, --min-keep and --round-to limit it)"
            )
        lo, hi = 0, len(candidates) - 1  # smallest candidate that meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if self.removed(target.kind, float(candidates[mid])) >= target.value:
                hi = mid
            else:
                lo = mid + 1
        return float(candidates[lo])

    def thresholds(self) -> np.ndarray:
        """Every threshold that changes a kept count, ascending (so: fewer units kept)."""
        return np.unique(np.concatenate([[-np.inf], *self.tails.values()]))

    def plan(self, target: Target) -> Plan:
        threshold = self.threshold_for(target)
        counts = self.kept_counts(threshold)
        if target.kind in ("ratio", "flops", "params") and max(self.steps.values(), default=1) > 1:
            counts = self.give_back(counts, target)
        return self.plan_at(threshold, target, counts)

    def give_back(self, counts: dict[int, int], target: Target) -> dict[int, int]:
        """Re-add whole --round-to steps of units while the target still holds, the step whose
        first unit has the highest score first: rounding up several spaces at one threshold
        can remove far more than asked (a small CNN at --flops 0.3 --round-to 8 lost 44% of
        its MACs)."""
        counts = dict(counts)
        while True:
            candidates = sorted((sid for sid in counts if counts[sid] < len(self.tails[sid])),
                                key=lambda sid: -self.tails[sid][counts[sid]])
            for sid in candidates:
                trial = {**counts, sid: min(len(self.tails[sid]), counts[sid] + self.steps[sid])}
                if self.removed_with(target.kind, trial) >= target.value:
                    counts = trial
                    break
            else:
                return counts

    def plan_at(self, threshold: float, target: Target, counts: dict[int, int] | None = None) -> Plan:
        """The plan at `threshold` (or with the given kept counts)."""
        counts = self.kept_counts(threshold) if counts is None else counts
        return Plan({sid: self.space_plan(sid, counts[sid]) for sid in self.scores}, threshold, target)


class UniformPlanner(Planner):
    """The same fraction of every space's units removed (the baseline the global threshold must
    beat): the threshold is that fraction, the units go in each space's own order; a space's
    gain divides the fraction it loses."""

    gains: dict[int, float] | None = None

    def with_gains(self, gains: dict[int, float]) -> Planner:
        """Gains multiply like the other rules' (a second call scales the first's); in place."""
        current = self.gains or {}
        self.gains = {sid: current.get(sid, 1.0) * gains.get(sid, 1.0) for sid in self.tails}
        return self

    def kept_counts(self, threshold: float) -> dict[int, int]:
        counts = {}
        for sid, tail in self.tails.items():
            n, gain = len(tail), (self.gains or {}).get(sid, 1.0)
            fraction = min(max(threshold, 0.0) / gain, 1.0)
            counts[sid] = self.stepped(sid, n - int(np.floor(fraction * n + 1e-9)))
        return counts

    def threshold_for(self, target: Target) -> float:
        if target.kind == "tolerance":
            raise TargetError("--allocation uniform needs a ratio, flops or params target (a tolerance is a threshold on energies)")
        return super().threshold_for(target)

    def thresholds(self) -> np.ndarray:
        """Every fraction that changes a kept count, ascending (so: fewer units kept)."""
        gains = self.gains or {}
        fractions = [np.arange(len(t) + 1) / len(t) * gains.get(sid, 1.0) for sid, t in self.tails.items() if len(t)]
        return np.unique(np.concatenate([[-np.inf], *fractions]))


class TemperedPlanner(Planner):
    """One threshold on the geometric mean of the tail energy fraction (global) and the tail
    unit fraction (uniform) of every position: spaces whose energy is concentrated in a few
    units are still pruned harder, but less so than by the energy alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for sid, tail in self.tails.items():
            n = len(tail)
            self.tails[sid] = np.sqrt(np.maximum(tail, 0.0) * (n - np.arange(n)) / max(n, 1))


class SensitivityPlanner(Planner):
    """One threshold on every space's normalised energy lost times its measured gain
    (`sensitivity.measure_sensitivity`): the threshold compares estimated output errors."""

    def __init__(self, *args, gains: dict[int, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if gains is None:
            raise TargetError("this allocation needs measured gains (onnxprune.sensitivity, onnxprune.streams)")
        self.with_gains(gains)


class StreamPlanner(SensitivityPlanner):
    """One threshold on every space's normalised energy lost times the share of its consumers'
    output in the residual stream it joins (`streams.measure_stream_gains`): the threshold
    compares relative perturbations of the streams."""


ALLOCATIONS = ("auto", "global", "uniform", "tempered", "stream", "sensitivity")  # auto: onnxprune.selection
DEFAULT_ALLOCATION = "auto"  # measured: docs/benchmark.md (allocation ablation)
MEASURED = ("stream", "sensitivity")  # rules whose planner needs gains measured on the model
PLANNERS = {"global": Planner, "uniform": UniformPlanner, "tempered": TemperedPlanner, "stream": StreamPlanner,
            "sensitivity": SensitivityPlanner}


def make_plan(
    analysis: Analysis,
    scores: dict[int, SpaceScore],
    cost: CostModel,
    target: Target,
    min_keep: float = 1,
    round_to: int = 1,
    allocation: str = "global",
) -> Plan:
    """Plan every prunable space of `analysis` to meet `target`: one global threshold on the
    normalised energies, or the same fraction everywhere (`allocation="uniform"`)."""
    return make_planner(analysis, scores, cost, min_keep, round_to, allocation).plan(target)


def make_planner(analysis: Analysis, scores: dict[int, SpaceScore], cost: CostModel, min_keep: float = 1, round_to: int = 1,
                 allocation: str = "global", gains: dict[int, float] | None = None) -> Planner:
    """A planner over the prunable spaces of `analysis` (`gains`: the sensitivity allocation's)."""
    if allocation == "auto":
        raise TargetError("the auto allocation is chosen by measuring candidates (onnxprune.selection), it has no planner")
    if allocation not in PLANNERS:
        raise TargetError(f"unknown allocation '{allocation}' (choose from {', '.join(ALLOCATIONS)})")
    prunable = {s.id: s for s in analysis.prunable}
    extra = {"gains": gains} if allocation in MEASURED else {}
    return PLANNERS[allocation]({sid: sc for sid, sc in scores.items() if sid in prunable}, cost, min_keep, round_to,
                                {sid: unit_width(space) for sid, space in prunable.items()}, analysis=analysis, **extra)
