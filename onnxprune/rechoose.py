"""Choosing a space's kept units again during the sequential pass (`--rechoose`): the same
count, the units of the model as pruned upstream that best predict the original's activations
at the space's sites (the one-shot plan ranked them on the unpruned model; docs/design.md,
"Re-choosing kept units")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .analyse import Space
from .graph import GraphIndex
from .plan import Plan, SpacePlan
from .recovery import Recovery, fit_recovery
from .score import RIDGE, consumer_metric
from .segments import GraphSegment
from .stats import CrossMoments, SiteStats
from .streams import JOINS

BLOCK_ELEMENTS = 4096  # a site of multi-element units (heads, Flatten positions) wider than this keeps the plan's choice
MAX_UNITS = 2048  # wider spaces keep it too: the greedy pass costs about units^2 x metric columns (3 s at 2048 here)
MAX_SPAN = 5  # segments a space's sites may span: the pass runs both models ahead over them (a DenseNet layer's reach 49)


def rechoosable(spaces: list[Space], segments: list[GraphSegment], fixed: set[str], index: GraphIndex,
                shared: set[str] = frozenset()) -> list[Space]:
    """The spaces the pass can choose again: the `candidates` whose sites are all measured in one
    segment, or that are not a residual stream (a squeeze-excitation expansion, read by the
    gate's pool and by the projection after it): the choice is made at the first site, the pass
    running ahead to the later ones. Between a residual stream's sites lie whole blocks whose
    own units are not chosen yet (measured worse on ResNet and MobileNetV2, docs/benchmark.md).
    A space at `shared` sites (a Concat's branch) qualifies if they are its own sites and its
    units single elements: it is chosen beside the other spaces' kept channels there. Sites
    spanning more than MAX_SPAN segments keep the plan's units (the look-ahead's cost)."""
    segment_of = {t: i for i, segment in enumerate(segments) for t in segment.sites}

    def qualifies(space: Space) -> bool:
        at_shared = set(space.tensors) & shared
        if at_shared and not (at_shared <= set(space.sites) and all(space.tensors[t].block == 1 for t in space.sites)):
            return False  # the other channels join the choice as extra single-element units, at its own sites only
        first, last = min(segment_of[t] for t in space.sites), max(segment_of[t] for t in space.sites)
        return first == last or (last - first < MAX_SPAN and not residual(space, index))
    return [s for s in candidates(spaces, fixed) if qualifies(s)]


def residual(space: Space, index: GraphIndex) -> bool:
    """Whether the space's units are summed from two of its own tensors (a residual join)."""
    for tensor in space.tensors:
        node = index.producer.get(tensor)
        if node is not None and (node.op_type in JOINS or node.op_type == "Sub"):
            if sum(name in space.tensors for name in node.input if name and not index.is_constant(name)) >= 2:
                return True
    return False


def candidates(spaces: list[Space], fixed: set[str]) -> list[Space]:
    """The spaces whose units could be chosen again: holding each unit once at every site, no
    tensor in `fixed` (the model's inputs and outputs), nothing read back by a recurrent
    op, at most MAX_UNITS units, and multi-element units only on sites of at most BLOCK_ELEMENTS
    elements (each pick solves a block per unit)."""

    def measurable(space: Space, tensor: str) -> bool:
        placement = space.tensors[tensor]
        units = np.sort(placement.unit_positions()[0])
        return np.array_equal(units, np.arange(space.n)) and (placement.block == 1 or placement.size <= BLOCK_ELEMENTS)

    return [s for s in spaces if s.n <= MAX_UNITS and not set(s.tensors) & fixed and not s.recurrent_reads and not s.cache_io
            and all(measurable(s, t) for t in s.sites)]


def unpruned(plan: Plan, spaces: list[Space]) -> Plan:
    """`plan` with every unit of `spaces` kept: the pruned model then shows them all."""
    changed = {s.id: SpacePlan(s.id, s.n, np.arange(s.n), np.zeros(0, dtype=np.int64)) for s in spaces}
    return dataclasses.replace(plan, spaces={**plan.spaces, **changed})


def site_stats(count: int, mean: np.ndarray, cov: np.ndarray) -> SiteStats:
    """Calibration statistics (count, sums, Gram) with the given mean and centred covariance."""
    return SiteStats(count, mean * count, (cov + np.outer(mean, mean)) * count)


@dataclass
class SharedColumns:
    """At a shared site: the original's elements the pruned run shows (`present`, sorted) and
    those of them that stay whatever this space keeps (`locked`: the other spaces' kept
    channels and channels of no space)."""

    present: np.ndarray
    locked: np.ndarray


def rechosen(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex,
             shared: dict[str, SharedColumns] | None = None) -> SpacePlan:
    """The `kept` units that best predict the original's activations at the space's sites from
    the pruned model's (every unit of the space shown there, as `unpruned` made it)."""
    keep = np.sort(greedy_cross_selection(space, kept, moments, index, shared))
    return SpacePlan(space.id, space.n, keep, np.setdiff1d(np.arange(space.n), keep))


def greedy_cross_selection(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex,
                           shared: dict[str, SharedColumns] | None = None) -> np.ndarray:
    """The space's `kept` units chosen by `forward_selection` on its sites' moments in unit-major
    layout, the original's activations weighed by the consumers' weights (V V^T = sum W^T W).
    At a shared site the other channels the pruned model keeps there are taken first (extra
    units after the space's own, zero at its other sites) and the target is every channel."""
    shared = shared or {}
    extra = max((len(c.locked) for c in shared.values()), default=0)
    covariances, crosses, blocks = [], [], []
    for tensor, m in moments.items():
        placement = space.tensors[tensor]
        rows, cols = placement.unit_major()
        layout = np.empty(len(rows), dtype=np.int64)
        layout[rows] = cols  # unit j's elements at j * block ... (j + 1) * block - 1
        if tensor in shared:
            columns = shared[tensor]
            pruned = np.searchsorted(columns.present, np.concatenate([layout, columns.locked]))
            target = np.arange(placement.size)
            cov, s_po = m.cov_pp[np.ix_(pruned, pruned)], m.cov_po[np.ix_(pruned, target)]
            metric = consumer_metric(space, tensor, index, target)
        else:
            cov, s_po = m.cov_pp[np.ix_(layout, layout)], m.cov_po[np.ix_(layout, layout)]
            metric = consumer_metric(space, tensor, index, layout)
        missing = space.n * placement.block + extra - len(cov)  # extra units of no variance, none of them here
        cov, s_po = np.pad(cov, (0, missing)), np.pad(s_po, ((0, missing), (0, 0)))
        covariances.append(cov)
        crosses.append(s_po @ metric if metric is not None else s_po)
        blocks.append(placement.block)
    first = [space.n + i for i in range(extra)] + sorted(space.locked)
    chosen = forward_selection(covariances, crosses, kept + extra, first, blocks)
    return chosen[chosen < space.n]


def forward_selection(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int] = (),
                      blocks: list[int] | None = None) -> np.ndarray:
    """Greedy choice of `kept` units (`first` ones first) of the pruned model's activations x~
    maximising sum over sites of tr(T_K^T S~_KK^-1 T_K), T = S~o V: the consumer-weighted energy
    of the original's activations that the chosen units explain, the sequential fit's objective
    (docs/design.md, "Re-choosing kept units"). Each pick adds tr(t_j^T s_jj^-1 t_j) of the
    moments left once the picked units are regressed out. At a site of `blocks[i]` elements per
    unit, unit j owns elements j*block ... (j+1)*block - 1."""
    blocks = blocks or [1] * len(covariances)
    sites = [_Columns(c, t, kept) if b == 1 else _Blocks(c, t, b) for c, t, b in zip(covariances, crosses, blocks, strict=True)]
    n = len(covariances[0]) // blocks[0]
    floor = RIDGE * max(sum(np.trace(c) for c in covariances) / sum(len(c) for c in covariances), np.finfo(float).tiny)
    alive = np.ones(n, dtype=bool)
    chosen: list[int] = []
    forced = list(first)
    for _ in range(kept):
        j = forced.pop(0) if forced else int(np.argmax(np.where(alive, sum(s.gains(floor) for s in sites), -np.inf)))
        chosen.append(j)
        alive[j] = False
        for site in sites:
            site.pick(j, floor)
    return np.array(chosen, dtype=np.int64)


class _Columns:
    """One site of single-element units in `forward_selection`: the pivoted Cholesky columns L of
    S~ and rows P of the residual cross moments so far, with every unit's residual variance d and
    residual cross energy a = ||t_u||^2; matrix-vector products only, never an n x n update."""

    def __init__(self, cov: np.ndarray, cross: np.ndarray, kept: int):
        self.cov, self.cross = np.asarray(cov, dtype=np.float64), np.asarray(cross, dtype=np.float64)
        n = len(self.cov)
        self.factor = np.zeros((n, kept))
        self.rows = np.zeros((kept, self.cross.shape[1]))
        self.variance = np.diag(self.cov).copy()
        self.energy = np.sum(self.cross * self.cross, axis=1)
        self.steps = 0

    def gains(self, floor: float) -> np.ndarray:
        return np.where(self.variance > floor, np.maximum(self.energy, 0.0) / np.maximum(self.variance, floor), 0.0)

    def pick(self, j: int, floor: float) -> None:
        i, factor, rows = self.steps, self.factor[:, :self.steps], self.rows[:self.steps]
        self.steps += 1
        pivot = self.variance[j]
        if not pivot > floor:  # nothing of it left: regressing it out changes nothing
            return
        column = (self.cov[:, j] - factor @ factor[j]) / np.sqrt(pivot)
        row = (self.cross[j] - factor[j] @ rows) / np.sqrt(pivot)
        along = self.cross @ row - factor @ (rows @ row)  # t_u . row for every u
        self.energy += column * column * (row @ row) - 2 * column * along
        self.variance -= column * column
        self.factor[:, i], self.rows[i] = column, row


class _Blocks:
    """One site of multi-element units (attention heads): the residual moments themselves,
    deflated by each picked unit's block, R -= R[:, e] R_ee^-1 R[e, :]."""

    def __init__(self, cov: np.ndarray, cross: np.ndarray, block: int):
        self.residual, self.target = np.array(cov, dtype=np.float64), np.array(cross, dtype=np.float64)
        self.elements = np.arange(len(cov)).reshape(-1, block)

    def gains(self, floor: float) -> np.ndarray:
        e = self.elements
        blocks = self.residual[e[:, :, None], e[:, None, :]] + floor * np.eye(e.shape[1])
        t = self.target[e]  # units x block x metric columns
        return np.sum(t * np.linalg.solve(blocks, t), axis=(1, 2))

    def pick(self, j: int, floor: float) -> None:
        e = self.elements[j]
        column = np.linalg.solve(self.residual[np.ix_(e, e)] + floor * np.eye(len(e)), self.residual[e]).T
        self.target -= column @ self.target[e]
        self.residual -= column @ self.residual[e]


def one_shot_prior(space: Space, space_plan: SpacePlan, moments: dict[str, CrossMoments]) -> dict[tuple[int, str], Recovery]:
    """The one-shot recovery of the new keep set at each site, from the original model's
    moments of the pass (the prior the sequential fit shrinks toward)."""
    priors = {}
    for tensor, m in moments.items():
        placement = space.tensors[tensor]
        prune = placement.element_positions_of(space_plan.prune)
        if len(prune):
            stats = site_stats(m.count, m.mean_o, m.cov_oo)
            priors[(space.id, tensor)] = fit_recovery(stats, placement.element_positions_of(space_plan.keep), prune)
    return priors
