"""Sequential (error-correcting) recovery: every site is refitted on the model as already
pruned upstream, against the original model's activations (DESIGN §2, sequential recovery).

The node order is cut into segments (`segments.cut_segments`); both models' activations at
each cut are cached per batch, so each segment of the original runs once and each segment of
the pruned model once or twice, instead of a full forward pass per layer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx

from .analyse import Analysis
from .boundary import BoundaryCache
from .calibrate import make_session
from .crossgraph import CrossSite, accumulate, cross_patch
from .crossgraph import feeds as cross_feeds
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
        self.index, self.strides = index, strides
        self.spaces = [s for s in analysis.prunable if s.id in plan.spaces]

        sites = sorted({t for s in self.spaces for t in s.sites})
        graph_io = {v.name for v in [*original.graph.input, *original.graph.output]}
        fits = SiteFits(self.spaces, index, kind, shrinkage)
        self.segments: list[GraphSegment] = cut_segments(original, sites, shapes)
        position = {id(node): i for i, node in enumerate(original.graph.node)}
        self.consumer_positions = {t: [position[id(index.node(c.node))] for s in self.spaces for c in s.consumers if c.site == t]
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
                self._segment(segment, batches, cache_o, cache_p)
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

    def _segment(self, segment: GraphSegment, batches, cache_o: BoundaryCache, cache_p: BoundaryCache) -> None:
        new_boundary = [t for t in segment.boundary if t not in cache_o.names()]
        refit_boundary = any(p <= segment.stop for t in segment.sites for p in self.consumer_positions[t])
        # spaces chosen again after this run, at their first site: both models also run ahead to
        # their later sites, measured for the choice only (each is fitted in its own segment)
        again = [s for s in self.plans.pending.values() if set(s.sites) & set(segment.sites)]
        ahead = [t for s in again for t in s.sites if t not in segment.sites]
        measured = list(dict.fromkeys([*segment.sites, *ahead]))
        full_width = {t for s in again for t in s.sites}
        outputs_o = list(dict.fromkeys([*measured, *new_boundary]))
        original_part = extract(self.original, cache_o.dtypes(), outputs_o)
        # when a refitted site's consumer lies in this segment, the pruned run stops where the
        # sites are produced and resumes from there after the fit (only the tail runs twice)
        wanted = list(dict.fromkeys([*measured, *(segment.at_sites if refit_boundary else new_boundary)]))
        pruned = self._pruned_model(cache_p.names(), wanted, ahead=bool(ahead))
        present = {o for n in pruned.graph.node for o in n.output}  # a shape Concat replaced by its copies is gone
        pruned_outputs = [t for t in wanted if t in measured or t in present]
        pruned_part = extract(pruned, cache_p.dtypes(), pruned_outputs)
        del pruned
        # errors are handled by the caller (the one-shot model is written): onnxruntime need not print them
        session_o = make_session(original_part, spinning=False, log_level=4)
        session_p = None  # built at the first batch, once the sites' ranks and sizes are seen
        inputs_o = [i.name for i in original_part.graph.input]
        accumulators = {t: (self._new_stats(t, t in full_width), self._new_stats(t, True)) for t in measured}
        changed = dict.fromkeys(measured, False)
        resume = BoundaryCache() if refit_boundary else cache_p  # the pruned activations kept from this run
        kept_p = [t for t in pruned_outputs if t in (segment.at_sites if refit_boundary else new_boundary)]
        try:
            for i, (batch, heldout) in enumerate(batches()):
                if segment is self.segments[0] and not heldout:
                    self.result.samples += len(next(iter(batch.values())))
                out_o = dict(zip(outputs_o, session_o.run(None, self._feeds(inputs_o, batch, [cache_o], i, False)), strict=True))
                if session_p is None:
                    sites = {t: self._cross_site(t, out_o[t], len(accumulators[t][0].shift_p)) for t in measured}
                    shifts = {t: (cal.shift_p, cal.shift_o) for t, (cal, _) in accumulators.items()}
                    patch, cross = cross_patch(pruned_part, list(sites.values()), shifts, kept_p)
                    session_p = make_session(pruned_part, patch=patch, spinning=False, log_level=4)
                    inputs_p = [i.name for i in pruned_part.graph.input]
                    fetch = [*kept_p, *(n for t in measured for n in cross[t].fetched())]
                feeds = self._feeds(inputs_p, batch, [cache_p], i, True)
                for t in measured:
                    feeds.update(cross_feeds(cross[t], sites[t], out_o[t], accumulators[t][int(heldout)]))
                out_p = dict(zip(fetch, session_p.run(fetch, feeds), strict=True))
                for tensor in measured:
                    differs = accumulate(accumulators[tensor][int(heldout)], sites[tensor], out_p, cross[tensor])
                    changed[tensor] = changed[tensor] or differs
                for name in new_boundary:
                    cache_o.put(i, name, out_o[name])
                for name in kept_p:
                    resume.put(i, name, out_p[name])
            session_o = session_p = None
            moments = {t: (cal.moments(), held.moments() if held.count else None) for t, (cal, held) in accumulators.items()}
            shown = self.plans.run_removed  # what this run did not show: it places the kept units in the moments
            with single_blas_thread(self._small(measured)):
                if again:  # the rest of the segment (and the pass) then runs the units just chosen
                    self.decisions.rechoose(again, moments, [resume, cache_p] if resume is not cache_p else [cache_p])
                    self.decisions.forget_prefits(ahead)
                for tensor in segment.sites:
                    self.decisions.fit_site(tensor, *moments[tensor], changed[tensor], shown)
            if refit_boundary and new_boundary:
                self._resume(new_boundary, batches, cache_p, resume)
        finally:
            if resume is not cache_p:
                resume.close()
        keep = set(segment.boundary)
        cache_o.keep_only(keep)
        cache_p.keep_only(keep)
        for key in [k for k in self.result.recoveries if len(k) == 2 and k[1] in segment.sites]:
            self.result.recoveries[key] = self.result.spill.spill(self.result.recoveries[key])
        self.fold_cache = {}  # the next segment runs other consumers; the keys are ids, none may outlive its recovery

    def _resume(self, names: list[str], batches, cache_p: BoundaryCache, resume: BoundaryCache) -> None:
        """The pruned model's activations at the cut, with this segment's new folds applied,
        computed from the activations kept where its sites were produced."""
        available = {**cache_p.dtypes(), **resume.dtypes()}
        pruned = self._pruned_model(available, names)
        present = {o for n in pruned.graph.node for o in n.output}
        names = [t for t in names if t in present]
        if not names:
            return
        part = extract(pruned, available, names)
        session = make_session(part, spinning=False, log_level=4)
        inputs = [i.name for i in part.graph.input]
        for i, (batch, _) in enumerate(batches()):
            for name, value in zip(names, session.run(None, self._feeds(inputs, batch, [resume, cache_p], i, True)), strict=True):
                cache_p.put(i, name, value)

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

    def _cross_site(self, tensor: str, original: np.ndarray, kept: int) -> CrossSite:
        """How the pass measures site `tensor`, given one batch of the original's activation there."""
        placement = self._placement(tensor)
        stride = self.strides.get(tensor, 1) if placement.axis == 1 and original.ndim >= 3 else 1
        dims = [-(-d // stride) if a >= 2 else d for a, d in enumerate(original.shape) if a not in (0, placement.axis)]
        return CrossSite(tensor, placement.axis, original.ndim, stride, kept, placement.size, int(np.prod(dims, dtype=np.int64)))

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
