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
from .stats import CrossMoments, SiteStats, spd_inverse
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
    chosen = greedy_selection(covariances, crosses, kept + extra, first, blocks)
    return chosen[chosen < space.n]


def greedy_selection(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int] = (),
                     blocks: list[int] | None = None) -> np.ndarray:
    """The `kept` units (`first` among them) by the greedy pass with fewer steps: adding units
    (`forward_selection`) when fewer are kept than removed, else removing them
    (`backward_selection`); the same objective either way."""
    blocks = blocks or [1] * len(covariances)
    n = len(covariances[0]) // blocks[0]
    if n - kept < kept:
        try:
            return backward_selection(covariances, crosses, kept, first, blocks)
        except np.linalg.LinAlgError:  # moments too far from positive definite for the precision: add instead
            pass
    return forward_selection(covariances, crosses, kept, first, blocks)


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
    floor = _floor(covariances)
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


def _floor(covariances: list[np.ndarray]) -> float:
    """The ridge on residual variances: RIDGE x the mean variance over every site's elements."""
    return RIDGE * max(sum(np.trace(c) for c in covariances) / sum(len(c) for c in covariances), np.finfo(float).tiny)


def backward_selection(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int] = (),
                       blocks: list[int] | None = None) -> np.ndarray:
    """The greedy choice of `forward_selection`'s objective by removal: from every unit, remove
    the one whose removal loses the least, sum over sites of tr(Z_e^T P_ee^-1 Z_e) with the
    precision P = (S~_KK + floor I)^-1 and Z = P T_K of the units K left (for single elements
    ||z_j||^2 / P_jj, the multi-target form of OBS's w_j^2 / P_jj), until `kept` are left. P and
    Z are downdated in closed form after each removal. `first` units are never removed.
    Returns the kept units, ascending."""
    blocks = blocks or [1] * len(covariances)
    n = len(covariances[0]) // blocks[0]
    floor = _floor(covariances)
    sites = [_Removal(c, t, floor, n - kept) if b == 1 else _BlockRemoval(c, t, b, floor)
             for c, t, b in zip(covariances, crosses, blocks, strict=True)]
    alive = np.ones(n, dtype=bool)
    forced = np.zeros(n, dtype=bool)
    forced[list(first)] = True
    for _ in range(n - kept):
        costs = sum(s.costs() for s in sites)
        j = int(np.argmin(np.where(alive & ~forced, costs, np.inf)))
        alive[j] = False
        for site in sites:
            site.remove(j)
    return np.flatnonzero(alive)


def _precision(cov: np.ndarray, floor: float) -> np.ndarray:
    return spd_inverse(np.asarray(cov, dtype=np.float64) + floor * np.eye(len(cov)))


class _Removal:
    """One site of single-element units in `backward_selection`, matrix-vector products only:
    after removing r_1..r_s, P = P0 - U U^T and Z = Z0 - U W^T with u_k = P[:, r_k] / sqrt(P_rr)
    and w_k = Z[r_k] / sqrt(P_rr) at the time of removal; the costs need diag(P) and the
    squared row norms of Z, both downdated per removal."""

    def __init__(self, cov: np.ndarray, cross: np.ndarray, floor: float, steps: int):
        self.p0 = _precision(cov, floor)
        self.z0 = self.p0 @ np.asarray(cross, dtype=np.float64)
        self.u = np.zeros((steps, len(cov)))  # u_k as rows
        self.w = np.zeros((steps, self.z0.shape[1]))
        self.diagonal = np.diag(self.p0).copy()
        self.energy = np.sum(self.z0 * self.z0, axis=1)
        self.steps = 0

    def costs(self) -> np.ndarray:
        return self.energy / np.where(self.diagonal > 0, self.diagonal, np.inf)

    def remove(self, j: int) -> None:
        u, w = self.u[:self.steps], self.w[:self.steps]
        pivot = self.diagonal[j]
        column = self.p0[:, j] - u[:, j] @ u
        row = self.z0[j] - u[:, j] @ w
        if pivot > 0:
            column, row = column / np.sqrt(pivot), row / np.sqrt(pivot)
        else:  # nothing of it left: removing it changes nothing
            column, row = np.zeros_like(column), np.zeros_like(row)
        along = self.z0 @ row - (w @ row) @ u  # z_u . w for every unit u
        self.energy += column * column * (row @ row) - 2 * column * along
        self.diagonal -= column * column
        self.diagonal[j] = 0.0
        self.u[self.steps], self.w[self.steps] = column, row
        self.steps += 1


class _BlockRemoval:
    """One site of multi-element units (attention heads) in `backward_selection`: P and Z
    themselves, downdated by each removed unit's block, P -= P[:, e] P_ee^-1 P[e, :]; a removed
    unit's rows and columns are zero and its cost is never read again."""

    def __init__(self, cov: np.ndarray, cross: np.ndarray, block: int, floor: float):
        self.precision = _precision(cov, floor)
        self.z = self.precision @ np.asarray(cross, dtype=np.float64)
        self.elements = np.arange(len(cov)).reshape(-1, block)
        self.block = block

    def costs(self) -> np.ndarray:
        e = self.elements
        p = self.precision[e[:, :, None], e[:, None, :]]
        z = self.z[e]  # units x block x metric columns
        p[np.all(p == 0, axis=(1, 2))] = np.eye(self.block)  # removed units: z is zero there
        return np.sum(z * np.linalg.solve(p, z), axis=(1, 2))

    def remove(self, j: int) -> None:
        e = self.elements[j]
        gain = self.precision[:, e] @ np.linalg.inv(self.precision[np.ix_(e, e)])  # size x block
        self.z -= gain @ self.z[e]
        self.precision -= gain @ self.precision[e, :]
        self.precision[e, :] = 0.0
        self.precision[:, e] = 0.0
        self.z[e] = 0.0


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
