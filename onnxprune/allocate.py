"""The plan stage's planner for each `--allocation`: a fixed rule (global / uniform / tempered),
the stream rule after measuring the residual streams, the sensitivity rule after its probes, or
the auto choice among candidates (docs/design.md, "Allocation across layers")."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import onnx

from .analyse import Analysis
from .cost import CostModel
from .errors import ModelError, TargetError, failure_line
from .fidelity import ReferenceOutputs
from .graph import GraphIndex
from .plan import Plan, Planner, Target, make_planner, unit_width
from .preparation import Prepared
from .recovery import fit_recoveries
from .rewrite import cache_io_changes, rewrite
from .score import RECOVERY, SpaceScore
from .selection import AUTO_CANDIDATES, CHOICE_SAMPLES, AllocationChoice, choose_allocation
from .sensitivity import Sensitivity, default_probe_samples, measure_sensitivity
from .stats import SiteStats
from .streams import StreamGains, measure_stream_gains

DEFAULT_HEAD_GAIN = 4.0  # measured: docs/transformers.md (session 8), every rule on MiniLM and SmolLM2
# auto also tries its chosen rule with these head gains where heads and other units share the
# budget: the best gain moved with the model and the target (docs/transformers.md, session 23)
SEARCHED_HEAD_GAINS = (2.0, 8.0)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def attention_spaces(analysis: Analysis, index: GraphIndex) -> list[int]:
    """Spaces whose units are attention heads (the query heads, with grouped-query attention):
    several channels per unit, produced by MatMul/Gemm projections (a grouped Conv's whole
    groups are units of several channels too, but they are channels, not heads)."""
    return [s.id for s in analysis.prunable if unit_width(s) > 1 and all(index.node(p).op_type != "Conv" for p in s.producers)]


FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


def has_attention(index: GraphIndex) -> bool:
    """Whether the model multiplies two activations (q @ kᵀ, p @ v) or has a fused attention op,
    whether or not its heads are prunable."""
    return any(node.op_type in FUSED_ATTENTION
               or node.op_type in ("MatMul", "Einsum") and len(node.input) == 2 and not any(index.is_constant(i) for i in node.input)
               for node in index.nodes)


def candidate_builder(prepared: Prepared, stats: dict[str, SiteStats], method: str) -> Callable[[Plan], onnx.ModelProto]:
    """Rewrites a candidate plan with its one-shot recovery into a working copy (weights on disk
    stay there)."""

    def build(plan: Plan) -> onnx.ModelProto:
        recoveries = fit_recoveries(prepared.analysis, plan, stats, RECOVERY[method]) if method in RECOVERY else None
        return rewrite(prepared.original, prepared.analysis, plan, recoveries, prepared.index.constants, keep_on_disk=True)

    return build


def held_out_reference(prepared: Prepared) -> ReferenceOutputs:
    """The original's outputs on the held-out samples (the calibration samples if none are held
    out) that candidate models are scored on: auto's candidates and the sequential refit."""
    held_out = prepared.verify_data if prepared.verify_data.n_samples else prepared.calib_data
    return ReferenceOutputs(prepared.original, held_out, prepared.batch_size, CHOICE_SAMPLES)


def _auto_choice(planner: Callable[..., Planner], target: Target, prepared: Prepared, heads: list[int], head_gain: float | None,
                 build: Callable[[Plan], onnx.ModelProto], io_changes: Callable, progress: ProgressFactory) -> tuple[Planner, AllocationChoice]:
    """Auto's candidates scored at `target` on the held-out samples, then the head gains of the
    chosen rule (SEARCHED_HEAD_GAINS, where heads share the budget and no gain is given)."""
    streams = stream_gains(prepared, progress, required=False)
    names = [name for name in AUTO_CANDIDATES if name != "stream" or not streams.failed]

    def rule_gains(name: str) -> dict[int, float] | None:
        return streams.gains if name == "stream" else None

    planners = {name: planner(name, rule_gains(name)) for name in names}
    head_gains = SEARCHED_HEAD_GAINS if head_gain is None and 0 < len(heads) < len(prepared.analysis.prunable) else ()
    reference, seen = held_out_reference(prepared), {}
    advance = progress("choosing the allocation", len(planners) + len(head_gains))
    choice = choose_allocation(planners, target, reference, build, io_changes, advance, seen)
    if head_gains:  # the budget between heads and the other units, for the chosen rule
        rule = choice.chosen
        more = {f"{rule} (heads x{g:g})": planner(rule, rule_gains(rule), g) for g in head_gains}
        try:
            choice = choice.extended(choose_allocation(more, target, reference, build, io_changes, advance, seen))
        except TargetError:
            pass  # no other gain meets the target: the chosen rule stands
        except Exception as exc:  # noqa: BLE001 - as for a failed candidate: the chosen rule stands, the report says why
            choice.failed[", ".join(more)] = failure_line(exc)
        planners.update(more)
    choice.streams = streams
    return planners[choice.chosen], choice


def stand_in(target: Target, global_rule: Planner) -> Target | None:
    """The budget auto compares its candidates at, and the chosen rule then plans: a budget target
    itself; for a latency target the same fraction of the MACs (latency falls about as the MACs
    do, a little slower: docs/speed.md, section 3; the latency search then times the chosen
    rule's plans); for a tolerance the MACs the global threshold removes at it (the tolerance sets
    the size, the best rule spreads it: the global rule gutted SmolLM2's layer-11 FFN, whose one
    massive neuron makes every other look free). None where a tolerance removes no MACs."""
    if target.kind in ("ratio", "flops", "params"):
        return target
    if target.kind == "latency":
        return Target("flops", target.value)
    removed = global_rule.removed("flops", global_rule.threshold_for(target))
    return Target("flops", removed) if removed > 0 else None


def _stand_in_note(target: Target, compared_at: Target) -> str:
    """How the report names the budget a latency or tolerance target was compared at."""
    if target.kind == "latency":
        return f"--flops {compared_at.value:g}, the latency target's stand-in"
    return f"--flops {compared_at.value:.3g}, what --tolerance {target.value:g} removes with the global threshold"


def allocation_planner(
    allocation: str,
    target: Target,
    prepared: Prepared,
    scores: dict[int, SpaceScore],
    cost: CostModel,
    stats: dict[str, SiteStats],
    method: str,
    min_keep: float,
    round_to: int,
    sensitivity_samples: int | None,
    progress: ProgressFactory,
    head_gain: float | None = None,
) -> tuple[Planner, Sensitivity | AllocationChoice | StreamGains | None]:
    """The planner for `allocation`, and what was measured to make it (None for a fixed rule);
    auto with a latency or tolerance target compares the candidates at a MACs budget standing in
    for it (`stand_in`; `AllocationChoice.planned_at`). `head_gain` scales the attention heads' scores in every rule: the
    per-kind budget (None: DEFAULT_HEAD_GAIN, and auto also tries SEARCHED_HEAD_GAINS)."""
    analysis = prepared.analysis
    heads = attention_spaces(analysis, prepared.index)

    def planner(name: str, gains: dict[int, float] | None = None, head: float = head_gain or DEFAULT_HEAD_GAIN) -> Planner:
        made = make_planner(analysis, scores, cost, min_keep, round_to, name, gains)
        return made if head == 1 else made.with_gains(dict.fromkeys(heads, head))

    build, io_changes = candidate_builder(prepared, stats, method), partial(cache_io_changes, analysis)
    if allocation == "auto":
        global_rule = planner("global")
        compared_at = stand_in(target, global_rule)
        if compared_at is None:
            return global_rule, None
        try:
            chosen, choice = _auto_choice(planner, compared_at, prepared, heads, head_gain, build, io_changes, progress)
        except TargetError:
            if compared_at is target:
                raise
            return global_rule, None  # the latency search then says how far this model can go
        if compared_at is not target:
            choice.compared_at, choice.planned_at = _stand_in_note(target, compared_at), compared_at
        return chosen, choice
    if allocation == "stream":
        streams = stream_gains(prepared, progress)
        return planner(allocation, streams.gains), streams
    if allocation != "sensitivity":
        return planner(allocation), None
    base = planner("global")
    samples = sensitivity_samples or default_probe_samples(prepared.calib_data.n_samples, len(base.tails))
    reference = ReferenceOutputs(prepared.original, prepared.calib_data, prepared.batch_size, samples)
    measured = measure_sensitivity(base, target, reference, build, io_changes, progress("measuring sensitivity", len(base.tails)))
    return planner(allocation, measured.gains), measured


def stream_gains(prepared: Prepared, progress: ProgressFactory, required: bool = True) -> StreamGains:
    """The stream allocation's gains, measured on the first calibration samples. Unless the rule
    was asked for (`required`), a model onnxruntime cannot measure loses the candidate, not the run."""
    advance = progress("measuring the residual streams", 1)
    try:
        gains = measure_stream_gains(prepared.original, prepared.analysis, prepared.index, prepared.calib_data,
                                     prepared.batch_size, prepared.shapes)
    except ModelError as exc:
        if required:
            raise
        gains = StreamGains(dict.fromkeys((s.id for s in prepared.analysis.prunable), 1.0), 0, 0.0, failed=str(exc))
    advance(1)
    return gains
