"""Sequential (error-correcting) recovery: every site is refitted on the model as already
pruned upstream, against the original model's activations (DESIGN §2, sequential recovery).

The node order is cut into segments (`segments.cut_segments`); both models' activations at
each cut are cached per batch, and each segment of the original and of the pruned model runs
once, side by side in one session that also computes the cross moments (`crossgraph`), instead
of a full forward pass per layer. Where a refitted site's consumer lies in its own segment, the
next segment's pruned side starts where the sites were produced (that tail runs twice)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from .analyse import Analysis
from .boundary import BoundaryCache
from .calibrate import sampled_positions
from .crossgraph import PRUNED, CrossSite, JointSegment
from .decisions import PassDecisions, PassPlan, SequentialResult
from .graph import GraphIndex
from .placement import Placement
from .plan import Plan
from .rechoose import rechoosable
from .recovery import Recovery
from .rewrite import rewrite
from .segments import GraphSegment, cut_segments, extract, needed_nodes
from .sitefit import NONE, SiteFits
from .stats import SMALL_PRODUCT, CrossStats, SiteStats, single_blas_thread
from .verify import drop_units

SEQUENTIAL_SAMPLES = 512  # calibration samples the pass refits on by default (docs/speed.md, section 6)


class SequentialFitter:
    """Walks the segments once, refitting every (space, site) of the plan in node order."""

    def __init__(self, original: onnx.ModelProto, analysis: Analysis, plan: Plan, stats: dict[str, SiteStats],
                 index: GraphIndex, shapes: dict, strides: dict[str, int], kind: str = "lsq",
                 one_shot: dict[tuple[int, str], Recovery] | None = None, shrinkage: float | None = None,
                 rechoose: bool = False):
        self.original, self.analysis, self.stats = original, analysis, stats
        self.index, self.strides, self.shapes = index, strides, shapes
        self.spaces = [s for s in analysis.prunable if s.id in plan.spaces]

        sites = sorted({t for s in self.spaces for t in s.sites})
        graph_io = {v.name for v in [*original.graph.input, *original.graph.output]}
        fits = SiteFits(self.spaces, index, kind, shrinkage)
        self.segments: list[GraphSegment] = cut_segments(original, sites, shapes)
        self.produced_at = {o: i for i, node in enumerate(original.graph.node) for o in node.output if o}
        self.consumer_positions = {t: [self.produced_at[index.node(c.node).output[0]] for s in self.spaces for c in s.consumers if c.site == t]
                                   for t in sites}
        # a recurrent op's fold of its own hidden units (per direction, keys (space, site, d)) is
        # not refitted: R reads the pruned model's states whatever the fit, so it stays one-shot
        one_shot = one_shot or {}
        result = SequentialResult({k: v for k, v in one_shot.items() if len(k) == 3}, segments=len(self.segments), plan=plan)
        # spaces whose units are chosen again once their sites are measured: until then the pruned model runs all of them
        pending = {s.id: s for s in rechoosable(self.spaces, self.segments, graph_io, index, fits.shared)} if rechoose else {}
        self.decisions = PassDecisions(fits, PassPlan(analysis, plan, pending), one_shot, result)
        self.plans, self.result = self.decisions.plans, result
        self.fold_cache: dict = {}

    def run(self, batches: Callable[[], Iterable[tuple[dict[str, np.ndarray], bool]]], advance: Callable[[int], None]) -> SequentialResult:
        """`batches()` yields (inputs, held out) in the same order each time it is called."""
        cache_o, cache_p = BoundaryCache(), BoundaryCache()
        try:
            for segment in self.segments:
                cache_p = self._segment(segment, batches, cache_o, cache_p)
                advance(1)
        except BaseException:
            self.result.spill.close()
            raise
        finally:
            cache_o.close()
            cache_p.close()
        return self.result

    def _pruned_model(self, available: Iterable[str], outputs: list[str], ahead: bool = False) -> onnx.ModelProto:
        """A working copy of the pruned model with the recoveries fitted so far, rewritten only
        where the segment computing `outputs` from the `available` activations reads it. A run
        `ahead` of the pass (to the later sites of a space chosen again) crosses sites not fitted
        yet: their one-shot recoveries stand in (they act beyond the segment's cut only)."""
        positions, _ = needed_nodes(self.original, available, outputs)
        only = {self.index.label(self.original.graph.node[i]) for i in positions}
        recoveries = self.result.recoveries
        if ahead:
            recoveries = {**self.decisions.provisional(), **recoveries}
        return rewrite(self.original, self.analysis, self.plans.run, recoveries, self.index.constants, keep_on_disk=True,
                       fold_cache=self.fold_cache, only=only)

    def _segment(self, segment: GraphSegment, batches, cache_o: BoundaryCache, cache_p: BoundaryCache) -> BoundaryCache:
        """Measure and fit the segment's sites; returns the pruned model's activations the next
        segment starts from: at the cut, or, where a refitted site's consumer lies in this
        segment, where the sites are produced (the next segment's pruned side then runs this
        one's tail again, with the new folds)."""
        refit_boundary = any(p <= segment.stop for t in segment.sites for p in self.consumer_positions[t])
        # spaces chosen again after this run, at their first site: both models also run ahead to
        # their later sites, measured for the choice only (each is fitted in its own segment)
        again = [s for s in self.plans.pending.values() if set(s.sites) & set(segment.sites)]
        ahead = [t for s in again for t in s.sites if t not in segment.sites]
        measured = list(dict.fromkeys([*segment.sites, *ahead]))
        full_width = {t for s in again for t in s.sites}
        accumulators = {t: (self._new_stats(t, t in full_width), self._new_stats(t, True)) for t in measured}
        handed_on = [] if segment is self.segments[-1] else segment.at_sites if refit_boundary else None
        joint = self._joint(segment, measured, bool(ahead), handed_on, accumulators, cache_o, cache_p)
        handed = BoundaryCache() if refit_boundary else cache_p  # the pruned activations the next segment starts from
        try:
            changed = self._measure(joint, batches, accumulators, cache_o, cache_p, handed, first=segment is self.segments[0])
            joint = None
            moments = {t: (cal.moments(), held.moments() if held.count else None) for t, (cal, held) in accumulators.items()}
            shown = self.plans.run_removed  # what this run did not show: it places the kept units in the moments
            with single_blas_thread(self._small(measured)):
                if again:  # the rest of the segment (and the pass) then runs the units just chosen
                    self.decisions.rechoose(again, moments, [handed, cache_p] if handed is not cache_p else [cache_p])
                    self.decisions.forget_prefits(ahead)
                for tensor in segment.sites:
                    self.decisions.fit_site(tensor, *moments[tensor], changed[tensor], shown)
        except BaseException:
            if handed is not cache_p:
                handed.close()
            raise
        cache_o.keep_only(set(segment.boundary))
        if handed is not cache_p:
            cache_p.close()
        else:
            cache_p.keep_only(set(segment.boundary))
        for key in [k for k in self.result.recoveries if len(k) == 2 and k[1] in segment.sites]:
            self.result.recoveries[key] = self.result.spill.spill(self.result.recoveries[key])
        self.fold_cache = {}  # the next segment runs other consumers; the keys are ids, none may outlive its recovery
        return handed

    def _joint(self, segment: GraphSegment, measured: list[str], ahead: bool, handed_on: list[str] | None,
               accumulators: dict[str, tuple[CrossStats, CrossStats]], cache_o: BoundaryCache, cache_p: BoundaryCache) -> JointSegment:
        """The session running the segment of both models from their cached activations to the
        `measured` sites and what each hands on (the pruned side: `handed_on`, by default the
        activations at the cut that it has not cached yet)."""
        new_boundary = [t for t in segment.boundary if t not in cache_o.names()]
        if handed_on is None:
            handed_on = [t for t in segment.boundary if t not in cache_p.names()]
        original_part = extract(self.original, cache_o.dtypes(), list(dict.fromkeys([*measured, *new_boundary])))
        wanted = list(dict.fromkeys([*measured, *handed_on]))
        pruned = self._pruned_model(cache_p.names(), wanted, ahead=ahead)
        present = {o for n in pruned.graph.node for o in n.output}  # a shape Concat replaced by its copies is gone
        pruned_outputs = [t for t in wanted if t in measured or t in present]
        pruned_part = extract(pruned, cache_p.dtypes(), pruned_outputs)
        del pruned
        sites = [self._cross_site(t, len(accumulators[t][0].shift_p)) for t in measured]
        shifts = {t: (cal.shift_p, cal.shift_o) for t, (cal, _) in accumulators.items()}
        return JointSegment(original_part, pruned_part, sites, shifts, new_boundary, [t for t in pruned_outputs if t in handed_on])

    def _measure(self, joint: JointSegment, batches, accumulators: dict[str, tuple[CrossStats, CrossStats]], cache_o: BoundaryCache,
                 cache_p: BoundaryCache, handed: BoundaryCache, first: bool) -> dict[str, bool]:
        """Run every batch through the joint session: its products go to the sites' statistics
        (calibration or held out), the original's activations at the cut to `cache_o`, the
        pruned side's handed-on ones to `handed`. Returns, per site, whether the pruned model
        changed its activation."""
        changed = dict.fromkeys(accumulators, False)
        possible = {t: self._after_a_change(t) for t in accumulators}
        for i, (batch, heldout) in enumerate(batches()):
            if first and not heldout:
                self.result.samples += len(next(iter(batch.values())))
            out_o, out_p, differs = joint.run(self._feeds(joint.inputs_o, batch, [cache_o], i, False),
                                              self._feeds(joint.inputs_p, batch, [cache_p], i, True),
                                              {t: pair[int(heldout)] for t, pair in accumulators.items()})
            changed = {t: changed[t] or (differs[t] and possible[t]) for t in changed}
            for name, value in out_o.items():
                cache_o.put(i, name, value)
            for name, value in out_p.items():
                handed.put(i, name, value)
        return changed

    def _after_a_change(self, tensor: str) -> bool:
        """Whether a node before the one producing `tensor` runs differently in the pruned model
        (it lost units, or a fold changed its weights). Without one the site's values are the
        original's, whatever the joint session's round-off (its two sides may fuse differently)."""
        removed = [self.produced_at.get(t, -1) for t, r in self.plans.run_removed.items() if len(r)]
        folded = [p for key in self.result.recoveries for p in self.consumer_positions.get(key[1], [])]
        return min([*removed, *folded], default=len(self.produced_at)) < self.produced_at.get(tensor, -1)

    def _feeds(self, names: list[str], batch: dict[str, np.ndarray], caches: list[BoundaryCache], i: int, pruned: bool) -> dict[str, np.ndarray]:
        """Each input from the first cache that has it, else from the batch (cut to the pruned
        model's inputs)."""
        feeds = {}
        for name in names:
            cache = next((c for c in caches if c.has(i, name)), None)
            if cache is not None:
                feeds[name] = cache.get(i, name)
            else:
                feeds[name] = drop_units(batch[name], self.plans.run_io.get(name)) if pruned else batch[name]
        return feeds

    def _cross_site(self, tensor: str, kept: int) -> CrossSite:
        """How the pass measures site `tensor` (sampled like the calibration)."""
        placement, shape = self._placement(tensor), self.shapes[tensor]
        stride = self.strides.get(tensor, 1) if placement.axis == 1 and len(shape) >= 3 else 1
        return CrossSite(tensor, PRUNED + tensor, placement.axis, len(shape), stride, kept, placement.size,
                         sampled_positions(shape, placement.axis, stride))

    def _small(self, sites: list[str]) -> bool:
        """Whether the fits at these sites are small enough for one BLAS thread to be faster:
        OpenBLAS's threads made a 64 x 64 eigendecomposition 100x slower between onnxruntime's runs."""
        width = max((self._placement(t).size for t in sites), default=0)
        return width ** 3 < SMALL_PRODUCT

    def _placement(self, tensor: str) -> Placement:
        """Where the units of the space measured at site `tensor` lie on it."""
        return next(s.tensors[tensor] for s in self.spaces if tensor in s.tensors)

    def _new_stats(self, tensor: str, held: bool) -> CrossStats:
        shift = self.stats[tensor].mean() if tensor in self.stats else None
        width = self._placement(tensor).size
        if shift is None:
            shift = np.zeros(width)
        kept = np.setdiff1d(np.arange(width), self.plans.run_removed.get(tensor, NONE))
        return CrossStats(shift[kept].astype(np.float32), shift.astype(np.float32), with_oo=held)



def sequential_recoveries(original: onnx.ModelProto, analysis: Analysis, plan: Plan, stats: dict[str, SiteStats], index: GraphIndex,
                          shapes: dict, strides: dict[str, int], batches: Callable[[], Iterable[tuple[dict[str, np.ndarray], bool]]],
                          kind: str = "lsq", one_shot: dict[tuple[int, str], Recovery] | None = None,
                          progress: Callable[[str, int], Callable[[int], None]] | None = None,
                          shrinkage: float | None = None, rechoose: bool = False) -> SequentialResult:
    """Refit every site of the plan on the model pruned upstream: `batches()` yields the batches
    as (inputs, held out); the shrinkage toward the one-shot fit is chosen on the
    held-out ones unless `shrinkage` fixes it. `rechoose` chooses each space's units again where
    the pass can show the pruned model's all of them; `result.plan` is then the plan to fold."""
    fitter = SequentialFitter(original, analysis, plan, stats, index, shapes, strides, kind, one_shot, shrinkage, rechoose)
    advance = progress("sequential fit", len(fitter.segments)) if progress is not None else (lambda _: None)
    return fitter.run(batches, advance)
