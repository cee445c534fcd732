"""Re-choosing a space's kept units during the sequential pass (`--rechoose`): the same count,
ranked again on the pruned-upstream model's own activations at the space's sites, since the
one-shot plan ranked them on the unpruned model's (docs/design.md, "Re-choosing kept units")."""

from __future__ import annotations

import dataclasses

import numpy as np

from .analyse import Space
from .graph import GraphIndex
from .plan import Plan, SpacePlan
from .recovery import Recovery, fit_recovery, shared_site
from .score import RIDGE, consumer_metric, unit_block
from .segments import GraphSegment
from .stats import CrossMoments, SiteStats


def rechoosable(spaces: list[Space], segments: list[GraphSegment], fixed: set[str]) -> list[Space]:
    """The spaces the pass can rank again: every site measured in one segment (the choice is
    made there, on all of them), no tensor in `fixed` (shared sites, model inputs and outputs),
    and nothing read back by a recurrent op."""
    segment_of = {t: i for i, segment in enumerate(segments) for t in segment.sites}
    return [s for s in spaces if len({segment_of[t] for t in s.sites}) == 1 and not set(s.tensors) & fixed
            and not s.recurrent_reads and not s.cache_io]


def fixed_tensors(spaces: list[Space], io_tensors: set[str]) -> set[str]:
    """Tensors whose spaces keep the one-shot choice: sites shared by several spaces (their
    columns are fitted together) and the model's cut inputs and outputs."""
    owners: dict[str, list[Space]] = {}
    for space in spaces:
        for tensor in space.sites:
            owners.setdefault(tensor, []).append(space)
    return {t for t, o in owners.items() if shared_site(o, t)} | io_tensors


def unpruned(plan: Plan, spaces: list[Space]) -> Plan:
    """`plan` with every unit of `spaces` kept: the pruned model then shows them all."""
    changed = {s.id: SpacePlan(s.id, s.n, np.arange(s.n), np.zeros(0, dtype=np.int64)) for s in spaces}
    return dataclasses.replace(plan, spaces={**plan.spaces, **changed})


def site_stats(count: int, mean: np.ndarray, cov: np.ndarray) -> SiteStats:
    """Calibration statistics (count, sums, Gram) with the given mean and centred covariance."""
    return SiteStats(count, mean * count, (cov + np.outer(mean, mean)) * count)


def rechosen(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex) -> SpacePlan:
    """The `kept` units that best predict the original's activations at the space's sites from
    the pruned model's (every unit of the space shown there, as `unpruned` made it)."""
    keep = np.sort(greedy_cross_selection(space, kept, moments, index))
    return SpacePlan(space.id, space.n, keep, np.setdiff1d(np.arange(space.n), keep))


def greedy_cross_selection(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex) -> np.ndarray:
    """The space's `kept` units chosen by `forward_selection` on its sites' moments in unit-major
    layout, the original's activations weighed by the consumers' weights (V V^T = sum W^T W)."""
    block = unit_block(space)
    covariances, crosses = [], []
    for tensor, m in moments.items():
        rows, cols = space.tensors[tensor].unit_major()
        layout = np.empty(space.n * block, dtype=np.int64)
        layout[rows] = cols  # unit j's elements at j * block ... (j + 1) * block - 1
        metric = consumer_metric(space, tensor, index, layout)
        s_po = m.cov_po[np.ix_(layout, layout)]
        covariances.append(m.cov_pp[np.ix_(layout, layout)])
        crosses.append(s_po @ metric if metric is not None else s_po)
    return forward_selection(covariances, crosses, kept, sorted(space.locked), block)


def forward_selection(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int] = (),
                      block: int = 1) -> np.ndarray:
    """Greedy choice of `kept` units (`first` ones first; unit j owns elements j*block ...) of the
    pruned model's activations x~ maximising sum over sites of tr(T_K^T S~_KK^-1 T_K), T = S~o V:
    the consumer-weighted energy of the original's activations that the chosen units explain,
    the sequential fit's objective (docs/design.md, "Re-choosing kept units"). Each pick adds
    tr(t_j^T s_jj^-1 t_j) of the moments left once the picked units are regressed out."""
    if block == 1:
        return _forward_selection_of_columns(covariances, crosses, kept, first)
    residuals = [np.array(c, dtype=np.float64) for c in covariances]
    targets = [np.array(t, dtype=np.float64) for t in crosses]
    n = len(residuals[0]) // block
    floor = RIDGE * max(sum(np.trace(r) for r in residuals) / (n * block), np.finfo(float).tiny)
    elements = np.arange(n * block).reshape(n, block)
    alive = np.ones(n, dtype=bool)
    chosen: list[int] = []
    forced = list(first)
    for _ in range(kept):
        gain = sum(_unit_gains(r, t, elements, floor) for r, t in zip(residuals, targets, strict=True))
        j = forced.pop(0) if forced else int(np.argmax(np.where(alive, gain, -np.inf)))
        chosen.append(j)
        alive[j] = False
        e = elements[j]
        for r, t in zip(residuals, targets, strict=True):  # deflate by the picked unit: R -= R[:, e] R_ee^-1 R[e, :]
            column = np.linalg.solve(r[np.ix_(e, e)] + floor * np.eye(block), r[e]).T
            t -= column @ t[e]
            r -= column @ r[e]
    return np.array(chosen, dtype=np.int64)


class _Columns:
    """One site's state in `_forward_selection_of_columns`: the pivoted Cholesky columns L of S~
    and rows P of the residual cross moments so far, with every column's residual variance d
    and residual cross energy a = ||t_u||^2; matrix-vector products only, never an n x n update."""

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


def _forward_selection_of_columns(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int]) -> np.ndarray:
    """`forward_selection` for one element per unit, as a pivoted Cholesky of S~ (DESIGN §2)."""
    sites = [_Columns(c, t, kept) for c, t in zip(covariances, crosses, strict=True)]
    n = len(sites[0].cov)
    floor = RIDGE * max(sum(np.trace(s.cov) for s in sites) / n, np.finfo(float).tiny)
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


def _unit_gains(residual: np.ndarray, target: np.ndarray, elements: np.ndarray, floor: float) -> np.ndarray:
    """Per unit, tr(t_u^T (s_uu + floor I)^-1 t_u); 0 for units with no variance left."""
    if elements.shape[1] == 1:
        variance = np.diag(residual)
        return np.where(variance > floor, np.sum(target * target, axis=1) / np.maximum(variance, floor), 0.0)
    blocks = residual[elements[:, :, None], elements[:, None, :]] + floor * np.eye(elements.shape[1])
    t = target[elements]  # units x block x metric columns
    return np.sum(t * np.linalg.solve(blocks, t), axis=(1, 2))


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
