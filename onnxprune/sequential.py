"""Sequential (error-correcting) recovery: every site is refitted on the model as already
pruned upstream, against the original model's activations (DESIGN §2, sequential recovery).

The node order is cut into segments (`segments.cut_segments`); both models' activations at
each cut are cached per batch, so each segment of the original runs once and each segment of
the pruned model once or twice, instead of a full forward pass per layer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import tempfiles
from .analyse import Analysis, Space
from .calibrate import make_session
from .graph import GraphIndex
from .placement import expand_blocks
from .plan import Plan
from .rechoose import one_shot_prior, rechoosable, rechosen, unpruned
from .recovery import Recovery, SequentialFit
from .rewrite import cache_io_changes, pruned_spaces, removed_slots, rewrite
from .segments import GraphSegment, cut_segments, extract, needed_nodes
from .sitefit import SiteFits
from .stats import CrossMoments, CrossStats, SiteStats
from .verify import drop_units

SPILL_BYTES = 64 << 20  # cached activations beyond this (per model) go to temporary files
SEQUENTIAL_SAMPLES = 512  # calibration samples the pass refits on by default (docs/speed.md, section 6)


RECOVERY_SPILL_BYTES = 1 << 20  # a fitted recovery's maps beyond this wait in a file for the final rewrite


class RecoverySpill:
    """The fitted recoveries of the segments already done: their k x n maps go to .npy files in an
    owner-named temporary folder and are read back memory-mapped (by a later segment's working
    copy or the final rewrite), so the pass's memory does not grow with depth (a 7B model's FFN
    site alone holds about 350 MB of them)."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.count = 0

    def spill(self, recovery: Recovery) -> Recovery:
        arrays = {"weights": recovery.weights, "kept_weights": recovery.kept_weights}
        if sum(a.nbytes for a in arrays.values() if a is not None) < RECOVERY_SPILL_BYTES:  # called once per site
            return recovery
        if self.folder is None:
            self.folder = tempfiles.make_folder(tempfiles.BOUNDARY_PREFIX)
        mapped = {}
        for name, array in arrays.items():
            if array is not None:
                path = self.folder / f"{self.count}.npy"
                self.count += 1
                np.save(path, array)
                mapped[name] = np.load(path, mmap_mode="r")
        return dataclasses.replace(recovery, **mapped)

    def close(self) -> None:
        if self.folder is not None:
            tempfiles.remove(self.folder)
            self.folder = None


@dataclass
class SequentialResult:
    """The recoveries and, per (space name, site), what the fit chose."""

    recoveries: dict[tuple, Recovery]  # (space, site), and (space, site, direction) for R (recovery.state_recoveries)
    spill: RecoverySpill = field(default_factory=RecoverySpill)  # close() once the recoveries are folded
    fits: dict[tuple[str, str], SequentialFit] = field(default_factory=dict)
    segments: int = 0
    heldout_errors: tuple[float, float] | None = None  # the model's output error, one-shot and refitted
    samples: int = 0  # calibration samples the pass refitted on
    rejected: str | None = None  # why the refit was not kept although its held-out error was lower
    plan: Plan | None = None  # the plan the recoveries fold into (`rechoose` may change keep sets, never counts)
    rechosen: list[str] = field(default_factory=list)  # spaces whose kept units the pass chose again
    retried: str | None = None  # set on a pass with the plan's units run after a refused one with units chosen again

    @property
    def kept(self) -> bool:
        """Whether the refit was kept (no worse than one-shot on the held-out samples, and stable)."""
        if self.rejected is not None:
            return False
        return self.heldout_errors is None or self.heldout_errors[1] <= self.heldout_errors[0]

    def summary(self) -> dict:
        """For the report: shrinkage chosen per site and the held-out error ratio to one-shot."""
        rows = []
        for (space, site), fit in self.fits.items():
            ratio = fit.error / fit.error_one_shot if fit.error is not None and fit.error_one_shot else None
            ratio = ratio if ratio is None or np.isfinite(ratio) else None
            rows.append({"space": space, "site": site, "shrinkage": "inf" if np.isinf(fit.shrinkage) else fit.shrinkage,
                         "heldout_error_vs_one_shot": None if ratio is None else round(ratio, 4)})
        ratios = [r["heldout_error_vs_one_shot"] for r in rows if r["heldout_error_vs_one_shot"] is not None]
        errors = None if self.heldout_errors is None else [float(f"{e:.4g}") for e in self.heldout_errors]
        return {"segments": self.segments, "samples": self.samples, "sites": rows, "kept": self.kept, "rejected": self.rejected,
                "rechosen": self.rechosen, "retried": self.retried,
                "heldout_model_error": errors,
                "median_heldout_error_vs_one_shot": float(np.median(ratios)) if ratios else None}


class SpillFile:
    """One tensor's spilled batches, appended to one temporary file and read back a batch at a
    time (one `pread` into a fresh array: a memory map of the whole file would keep every page
    read in the process's resident set). A file per batch cost an open, a header and an unlink
    per batch and tensor, about a fifth of a small CNN's sequential pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by `close` or by the first read
        self.size = 0
        self.reader: int | None = None

    def append(self, value: np.ndarray) -> int:
        if self.handle is None:
            raise RuntimeError(f"{self.path}: appended after it was read")
        offset = self.size
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        self.handle.write(data)
        self.size += len(data)
        return offset

    def read(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.reader is None:
            self.handle.close()
            self.handle = None
            self.reader = os.open(self.path, os.O_RDONLY)
        value = np.empty(shape, dtype=dtype)
        buffer, done = value.reshape(-1).view(np.uint8), 0
        while done < len(buffer):  # one call reads at most about 2 GB
            count = os.preadv(self.reader, [buffer[done:]], offset + done)
            if count <= 0:
                raise OSError(f"{self.path}: short read at {offset + done}")
            done += count
        return value

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None
        self.path.unlink(missing_ok=True)


@dataclass
class OnDisk:
    """A cached activation in a tensor's spill file; `selections` (axis, positions) narrow it as
    it is read back, so narrowing a spilled tensor costs no second write and read."""

    file: SpillFile
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    selections: tuple[tuple[int, np.ndarray], ...] = ()

    def load(self) -> np.ndarray:
        value = self.file.read(self.offset, self.shape, self.dtype)
        for axis, positions in self.selections:
            value = np.take(value, positions, axis=axis)
        return value

    def narrowed(self, axis: int, positions: np.ndarray) -> OnDisk:
        return dataclasses.replace(self, selections=(*self.selections, (axis, positions)))


class BoundaryCache:
    """Activations at the current cut, per batch; beyond SPILL_BYTES in memory they go to files
    (one per tensor) in an owner-named temporary folder, so memory stays at about one batch's worth."""

    def __init__(self) -> None:
        self.values: list[dict[str, np.ndarray | OnDisk]] = []  # one dict per batch, in batch order
        self.bytes = 0
        self.folder: Path | None = None
        self.files: dict[str, SpillFile] = {}
        self.count = 0

    def keep_only(self, names: set[str]) -> None:
        for values in self.values:
            for name in [n for n in values if n not in names]:
                value = values.pop(name)
                if not isinstance(value, OnDisk):
                    self.bytes -= value.nbytes
        for name in [n for n in self.files if n not in names]:
            self.files.pop(name).close()

    def put(self, batch: int, name: str, value: np.ndarray) -> None:
        while len(self.values) <= batch:
            self.values.append({})
        if self.bytes + value.nbytes > SPILL_BYTES:
            if self.folder is None:  # owner-named: swept by a later run if this one is killed
                self.folder = tempfiles.make_folder(tempfiles.BOUNDARY_PREFIX)
            if name not in self.files:
                self.files[name] = SpillFile(self.folder / f"{self.count}.bin")
                self.count += 1
            offset = self.files[name].append(value)
            self.values[batch][name] = OnDisk(self.files[name], offset, value.shape, value.dtype)
        else:
            self.bytes += value.nbytes
            self.values[batch][name] = value

    def has(self, batch: int, name: str) -> bool:
        return batch < len(self.values) and name in self.values[batch]

    def get(self, batch: int, name: str) -> np.ndarray:
        value = self.values[batch][name]
        return value.load() if isinstance(value, OnDisk) else value

    def names(self) -> set[str]:
        return set(self.values[0]) if self.values else set()

    def select(self, name: str, axis: int, positions: np.ndarray) -> None:
        """Keep only `positions` on `axis` of a cached tensor, in every batch (spilled batches
        are narrowed as they are read back)."""
        for values in self.values:
            value = values[name]
            if isinstance(value, OnDisk):
                values[name] = value.narrowed(axis, positions)
            else:
                values[name] = np.take(value, positions, axis=axis)
                self.bytes += values[name].nbytes - value.nbytes

    def dtypes(self) -> dict[str, np.dtype]:
        return {name: value.dtype for name, value in self.values[0].items()} if self.values else {}

    def close(self) -> None:
        self.values = []
        for file in self.files.values():
            file.close()
        self.files = {}
        if self.folder is not None:
            tempfiles.remove(self.folder)


def site_matrix(array: np.ndarray, axis: int, stride: int = 1) -> np.ndarray:
    """Units x rows (a contiguous float32 copy) of an activation, sampled like the calibration
    (stride on the spatial dims of channels-first maps)."""
    if stride > 1 and axis == 1 and array.ndim >= 3:
        array = array[(slice(None), slice(None), *[slice(None, None, stride)] * (array.ndim - 2))]
    matrix = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return np.array(matrix, dtype=np.float32, order="C", copy=True)


def removed_elements(analysis: Analysis, plan: Plan) -> dict[str, np.ndarray]:
    """Per tensor, the element positions on its unit axis that the plan removes (every space)."""
    removed, _, blocks = removed_slots(pruned_spaces(analysis, plan))
    return {tensor: expand_blocks(slots, blocks[tensor]) for tensor, slots in removed.items()}


class SequentialFitter:
    """Walks the segments once, refitting every (space, site) of the plan in node order."""

    def __init__(self, original: onnx.ModelProto, analysis: Analysis, plan: Plan, stats: dict[str, SiteStats],
                 index: GraphIndex, shapes: dict, strides: dict[str, int], kind: str = "lsq",
                 one_shot: dict[tuple[int, str], Recovery] | None = None, shrinkage: float | None = None,
                 rechoose: bool = False):
        self.shrinkage = shrinkage
        self.original, self.analysis, self.stats = original, analysis, stats
        self.index, self.strides, self.kind = index, strides, kind
        self.one_shot = dict(one_shot or {})
        self.spaces = [s for s in analysis.prunable if s.id in plan.spaces]
        self.plan = plan  # the final plan so far; `run_plan` is what the pruned model runs in the current segment
        self.run_plan, self.unpruned_plan = plan, None
        self.removed = self.run_removed = removed_elements(analysis, plan)
        self.prefit: dict[tuple[int, str], tuple[Recovery, SequentialFit]] = {}  # fits the choice of keep set already made
        self.io_changes = cache_io_changes(analysis, plan)

        sites = sorted({t for s in self.spaces for t in s.sites})
        graph_io = {v.name for v in [*original.graph.input, *original.graph.output]}
        self.fits = SiteFits(self.spaces, index, kind, shrinkage)
        self.owners, self.shared = self.fits.owners, self.fits.shared  # per site the spaces read there; sites fitted as one map
        self.segments: list[GraphSegment] = cut_segments(original, sites, shapes)
        position = {id(node): i for i, node in enumerate(original.graph.node)}
        self.consumer_positions = {t: [position[id(index.node(c.node))] for s in self.spaces for c in s.consumers if c.site == t]
                                   for t in sites}
        # a recurrent op's fold of its own hidden units (per direction, keys (space, site, d)) is
        # not refitted: R reads the pruned model's states whatever the fit, so it stays one-shot
        self.result = SequentialResult({k: v for k, v in self.one_shot.items() if len(k) == 3}, segments=len(self.segments), plan=plan)
        # spaces whose units are chosen again once their sites are measured: until then the pruned model runs all of them
        self.pending = {s.id: s for s in rechoosable(self.spaces, self.segments, graph_io, index, self.shared)} if rechoose else {}
        self._set_run_plan(self._run_plan())
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
            provisional = {k: v for k, v in self.one_shot.items() if k[0] not in self.pending and k[1] not in self.shared}
            recoveries = {**provisional, **recoveries}
        return rewrite(self.original, self.analysis, self.run_plan, recoveries, self.index.constants, keep_on_disk=True,
                       fold_cache=self.fold_cache, only=only)

    def _segment(self, segment: GraphSegment, batches, cache_o: BoundaryCache, cache_p: BoundaryCache) -> None:
        new_boundary = [t for t in segment.boundary if t not in cache_o.names()]
        refit_boundary = any(p <= segment.stop for t in segment.sites for p in self.consumer_positions[t])
        # spaces chosen again after this run, at their first site: both models also run ahead to
        # their later sites, measured for the choice only (each is fitted in its own segment)
        again = [s for s in self.pending.values() if set(s.sites) & set(segment.sites)]
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
        session_o, session_p = make_session(original_part, spinning=False, log_level=4), make_session(pruned_part, spinning=False, log_level=4)
        inputs_o = [i.name for i in original_part.graph.input]
        inputs_p = [i.name for i in pruned_part.graph.input]
        accumulators = {t: (self._new_stats(t, t in full_width), self._new_stats(t, True)) for t in measured}
        changed = dict.fromkeys(measured, False)
        resume = BoundaryCache() if refit_boundary else cache_p  # the pruned activations kept from this run
        kept_p = [t for t in pruned_outputs if t in (segment.at_sites if refit_boundary else new_boundary)]
        try:
            for i, (batch, heldout) in enumerate(batches()):
                if segment is self.segments[0] and not heldout:
                    self.result.samples += len(next(iter(batch.values())))
                out_o = dict(zip(outputs_o, session_o.run(None, self._feeds(inputs_o, batch, [cache_o], i, False)), strict=True))
                out_p = dict(zip(pruned_outputs, session_p.run(None, self._feeds(inputs_p, batch, [cache_p], i, True)), strict=True))
                for tensor in measured:
                    axis, stride = self._axis(tensor), self.strides.get(tensor, 1)
                    cols_p, cols_o = site_matrix(out_p[tensor], axis, stride), site_matrix(out_o[tensor], axis, stride)
                    changed[tensor] = changed[tensor] or cols_p.shape != cols_o.shape or not np.array_equal(cols_p, cols_o)
                    accumulators[tensor][int(heldout)].add_columns(cols_p, cols_o)
                for name in new_boundary:
                    cache_o.put(i, name, out_o[name])
                for name in kept_p:
                    resume.put(i, name, out_p[name])
            session_o = session_p = None
            moments = {t: (cal.moments(), held.moments() if held.count else None) for t, (cal, held) in accumulators.items()}
            shown = self.run_removed  # what this run did not show: it places the kept units in the moments
            if again:  # the rest of the segment (and the pass) then runs the units just chosen
                self._rechoose(again, moments, [resume, cache_p] if resume is not cache_p else [cache_p])
                for key in [k for k in self.prefit if k[1] in ahead]:
                    del self.prefit[key]  # a later site is fitted on its own segment's run
            for tensor in segment.sites:
                self._fit_site(tensor, *moments[tensor], changed[tensor], shown)
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

    def _run_plan(self) -> Plan:
        """The plan the pruned model runs: the final one, every unit kept in spaces not yet chosen again."""
        if self.unpruned_plan is None:  # built again only after a choice (`_rechoose` clears it)
            self.unpruned_plan = unpruned(self.plan, list(self.pending.values())) if self.pending else self.plan
        return self.unpruned_plan

    def _set_run_plan(self, plan: Plan) -> None:
        if plan is not self.run_plan:
            self.run_plan = plan
            self.run_removed = self.removed if plan is self.plan else removed_elements(self.analysis, plan)

    def _rechoose(self, spaces: list[Space], moments: dict[str, tuple[CrossMoments, CrossMoments | None]], caches: list[BoundaryCache]) -> None:
        """Choose the spaces' units again on the pruned model's activations (same counts); a new
        keep set is taken if its fit's held-out error is lower (never with nothing held out),
        with a one-shot prior of its own. The spaces' cached activations are narrowed to the choice."""
        spaces_plan = dict(self.plan.spaces)
        for space in spaces:
            site_moments = {t: moments[t][0] for t in space.sites}
            current = spaces_plan[space.id]
            shared = {t: self.fits.shared_columns(space, t, spaces_plan, self.run_removed) for t in space.sites if t in self.shared}
            candidate = rechosen(space, len(current.keep), site_moments, self.index, shared)
            if not np.array_equal(candidate.keep, current.keep):
                priors = one_shot_prior(space, candidate, site_moments)
                (new_error, new_fits), (old_error, old_fits) = (self.fits.keep_set(space, {**spaces_plan, space.id: p}, {**self.one_shot, **r}, moments, self.run_removed)
                                                                for p, r in ((candidate, priors), (current, {})))
                if new_error is not None and new_error < old_error:  # unguarded choices lost on two benchmarks
                    spaces_plan[space.id] = current = candidate
                    self.one_shot.update(priors)
                    self.result.rechosen.append(space.name)
                self.prefit.update(new_fits if current is candidate else old_fits)
            del self.pending[space.id]
        self.plan = dataclasses.replace(self.plan, spaces=spaces_plan)
        self.unpruned_plan = None
        self.removed = removed_elements(self.analysis, self.plan)
        self.result.plan = self.plan
        shown = self.run_removed
        self._set_run_plan(self._run_plan())
        self._narrow(spaces, caches, shown)

    def _narrow(self, spaces: list[Space], caches: list[BoundaryCache], shown: dict[str, np.ndarray]) -> None:
        """Cut the cached activations of the spaces just chosen (taken without the elements in
        `shown`) to what the rest of the pass runs (at a shared tensor the other spaces'
        channels stay as they were)."""
        for tensor in {t for s in spaces for t in s.tensors}:
            placement = next(s.tensors[tensor] for s in spaces if tensor in s.tensors)
            present = np.setdiff1d(np.arange(placement.size), shown.get(tensor, np.zeros(0, dtype=np.int64)))
            positions = np.flatnonzero(~np.isin(present, self.run_removed.get(tensor, np.zeros(0, dtype=np.int64))))
            if len(positions) == len(present):
                continue
            for cache in caches:
                if tensor in cache.names():
                    cache.select(tensor, placement.axis, positions)

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
                feeds[name] = drop_units(batch[name], self.io_changes.get(name)) if pruned else batch[name]
        return feeds

    def _axis(self, tensor: str) -> int:
        return next(s.tensors[tensor].axis for s in self.spaces if tensor in s.tensors)

    def _new_stats(self, tensor: str, held: bool) -> CrossStats:
        shift = self.stats[tensor].mean() if tensor in self.stats else None
        width = next(s.tensors[tensor].size for s in self.spaces if tensor in s.tensors)
        if shift is None:
            shift = np.zeros(width)
        kept = np.setdiff1d(np.arange(width), self.run_removed.get(tensor, np.zeros(0, dtype=np.int64)))
        return CrossStats(shift[kept].astype(np.float32), shift.astype(np.float32), with_oo=held)

    def _fit_site(self, tensor: str, cal: CrossMoments, held: CrossMoments | None, changed: bool, shown: dict[str, np.ndarray]) -> None:
        """Fit the site's recoveries from moments of a run that did not show the elements in `shown`."""
        if tensor in self.shared:  # a Concat or a channel shuffle: one map for all its spaces, under the first
            if len(self.removed.get(tensor, ())) or changed:
                owner = self.owners[tensor][0]
                recovery, fit = self.fits.shared_site(tensor, self.plan.spaces, self.one_shot, cal, held, shown)
                self.result.recoveries[(owner.id, tensor)] = recovery
                self.result.fits[(owner.name, tensor)] = fit
            return
        for space in self.owners.get(tensor, []):
            space_plan = self.plan.spaces[space.id]
            if not len(space_plan.prune) and not changed:
                continue  # nothing upstream changed this site: no correction (ratio 0 stays bit-identical)
            recovery, fit = self.prefit.pop((space.id, tensor), None) or self.fits.space_site(
                space, tensor, space_plan, self.one_shot.get((space.id, tensor)), cal, held, shown)
            self.result.recoveries[(space.id, tensor)] = recovery
            self.result.fits[(space.name, tensor)] = fit


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
