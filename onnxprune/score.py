"""Scoring: an order of each space's units (most important first) and the energy each unit
adds in that order. For SNP the energy is D_i of the constant-first Cholesky/LDL (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .analyse import Space
from .graph import GraphIndex
from .obs import obs_order, site_grams
from .placement import Placement, expand_blocks
from .stats import SiteStats, regularised, spd_inverse

ORDERS = ("pivoted", "weighted", "obs", "variance", "residual", "zca")
DEFAULT_ORDER = "weighted"  # measured: docs/benchmark.md (order ablation)
METHODS = ("snp", "lsq", "fluct", "wanda", "l1", "l2", "variance", "random")
# How each method compensates the pruned units: least squares, their mean (FLAP), or not at all.
RECOVERY = {"snp": "lsq", "lsq": "lsq", "fluct": "mean"}
STATS_METHODS = frozenset({"snp", "lsq", "fluct", "wanda", "variance"})
RIDGE = 1e-10  # relative to the mean unit variance: keeps exactly redundant units finite
# How the sites of a coupled space (a residual stream read by several blocks) are combined into
# one covariance to rank its units once: "covariance" sums them (sites with more energy count
# more); "normalised" gives every site the same total weight. See docs/design.md.
SITE_WEIGHTING = "covariance"


@dataclass
class SpaceScore:
    """Units of one space in pruning order (kept first) with their energies in that order."""

    space_id: int
    order: np.ndarray
    energy: np.ndarray
    standardised: bool = False  # FLAP-style: threshold z-scores of the energy instead of tail fractions
    locked: int = 0  # the first `locked` units of the order are always kept

    def prune_scores(self) -> np.ndarray:
        """Per position in the order, non-increasing: a unit is pruned when its score <= the threshold."""
        if not self.standardised:
            return self.tail_fraction()
        spread = self.energy.std()
        return (self.energy - self.energy.mean()) / spread if spread > 0 else np.zeros_like(self.energy)

    def tail_fraction(self) -> np.ndarray:
        """Normalised energy lost if units order[j:] are pruned, for each position j."""
        tail = np.cumsum(self.energy[::-1])[::-1]
        total = tail[0] if len(tail) else 0.0
        return tail / total if total > 0 else np.zeros_like(tail)


def ordered_cholesky(cov: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of the covariance in `order`; exactly redundant units in the middle
    of an order can leave a round-off negative pivot at the default ridge, so it is raised
    (x1000, up to 1e-4 of the mean variance) until the factor exists."""
    ridge = RIDGE
    while True:
        try:
            return sla.cholesky(regularised(cov, ridge)[np.ix_(order, order)], lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            if ridge >= 1e-4:
                raise
            ridge *= 1e3


def unit_block(space: Space) -> int:
    """Elements per unit at the space's sites (d_head for attention heads, the directions of a
    bidirectional LSTM's hidden unit, 1 otherwise)."""
    if not space.sites:
        return 1
    placement = space.tensors[space.sites[0]]
    return placement.block * placement.repeats


def unit_major(placement: Placement, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the space's unit-major elements and the tensor's, `block` per unit; a
    tensor that carries some units more often than others (a C2f Concat) adds its copies of a
    unit into the same elements."""
    if placement.repeats > 1:
        return placement.unit_major()
    units, positions = placement.unit_positions()
    return expand_blocks(units, block), expand_blocks(positions, block)


def space_covariance(space: Space, stats: dict[str, SiteStats]) -> np.ndarray:
    """Joint covariance of a space's elements in unit-major order: the sum over its sites of
    each site's block for these units (a unit may be a block of d_head elements)."""
    block = unit_block(space)
    cov = np.zeros((space.n * block, space.n * block))
    for tensor in space.sites:
        rows, cols = unit_major(space.tensors[tensor], block)
        site = stats[tensor].covariance()[np.ix_(cols, cols)]
        if SITE_WEIGHTING == "normalised" and np.trace(site) > 0:
            site = site / np.trace(site)
        np.add.at(cov, np.ix_(rows, rows), site)
    return cov


def space_second_moment(space: Space, stats: dict[str, SiteStats]) -> np.ndarray:
    """Per element (unit-major): E[x^2] summed over the space's sites (uncentred)."""
    block = unit_block(space)
    moment = np.zeros(space.n * block)
    for tensor in space.sites:
        rows, cols = unit_major(space.tensors[tensor], block)
        site = stats[tensor]
        np.add.at(moment, rows, np.diag(site.gram)[cols] / max(site.count, 1))
    return moment


def block_pivoted_order(cov: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy block pivoting: next is the unit whose residual block has the largest trace; its
    energy is that trace (the block Schur complement, DESIGN §2)."""
    n = len(cov) // block
    residual = regularised(cov, RIDGE)
    remaining = list(range(n))
    order, energy = [], []
    for _ in range(n):
        traces = [np.trace(residual[u * block:(u + 1) * block, u * block:(u + 1) * block]) for u in remaining]
        best = remaining.pop(int(np.argmax(traces)))
        order.append(best)
        energy.append(max(float(np.max(traces)), 0.0))
        idx = slice(best * block, (best + 1) * block)
        pivot = residual[idx, idx]
        columns = residual[:, idx]
        try:
            residual = residual - columns @ sla.solve(pivot, columns.T, assume_a="pos", check_finite=False)
        except (np.linalg.LinAlgError, ValueError):
            residual = residual - columns @ np.linalg.pinv(pivot) @ columns.T
    return np.array(order), np.array(energy)


def block_cholesky_energy(cov: np.ndarray, order: np.ndarray, block: int) -> np.ndarray:
    """Trace of each unit's residual block given the units before it: ||R_jj||_F^2."""
    if block == 1:
        return cholesky_energy(cov, order)
    elements = expand_blocks(order, block)
    r = ordered_cholesky(cov, elements)
    return np.array([np.sum(r[j * block:(j + 1) * block, j * block:(j + 1) * block] ** 2) for j in range(len(order))])


def cholesky_energy(cov: np.ndarray, order: np.ndarray) -> np.ndarray:
    """D_i = R_ii^2 of the Cholesky factor of the (regularised) covariance in `order`."""
    r = ordered_cholesky(cov, order)
    return np.diag(r) ** 2


def pivoted_order(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy pivoted Cholesky (LAPACK dpstrf): next is the unit with the largest residual."""
    n = len(cov)
    if not np.trace(cov) > 0:
        return np.arange(n), np.zeros(n)
    factor, piv, rank, _ = sla.lapack.dpstrf(regularised(cov, RIDGE), lower=0)
    order = piv[:n] - 1
    energy = np.zeros(n)
    energy[:rank] = np.diag(factor)[:rank] ** 2
    return order, energy


def consumer_weight_rows(space: Space, index: GraphIndex, consumer) -> np.ndarray:
    """The consumer's weights as one row per element of its site's unit axis."""
    weight = index.const(index.node(consumer.node).input[consumer.weight_index]).astype(np.float64)
    return np.moveaxis(weight, consumer.in_axis, 0).reshape(space.tensors[consumer.site].size, -1)


def consumer_metric(space: Space, tensor: str, index: GraphIndex, columns: np.ndarray) -> np.ndarray | None:
    """V with V V^T = sum over the consumers at this site of W^T W on the given columns: the
    residual at the site is weighed by what the consumers' outputs would lose (DESIGN §2)."""
    parts = []
    for consumer in space.consumers:
        if consumer.site != tensor or not index.is_constant(index.node(consumer.node).input[consumer.weight_index]):
            continue
        parts.append(consumer_weight_rows(space, index, consumer)[columns])
    if not parts:
        return None
    metric = np.hstack(parts)
    if metric.shape[1] > metric.shape[0]:  # compress to a square factor of the same V V^T
        gram = metric @ metric.T
        gram += 1e-12 * max(np.trace(gram) / len(gram), 1e-300) * np.eye(len(gram))
        metric = sla.cholesky(gram, lower=True, check_finite=False)
    return metric


def consumer_weight_norms(space: Space, index: GraphIndex, power: int = 2) -> np.ndarray:
    """Per element (unit-major): sum over consumers of the squared norm (power 2) or the L1 norm
    (power 1) of the weights reading it."""
    block = unit_block(space)
    norms = np.zeros(space.n * block)
    for consumer in space.consumers:
        per_element = (np.abs(consumer_weight_rows(space, index, consumer)) ** power).sum(axis=1)
        rows, cols = unit_major(space.tensors[consumer.site], block)
        np.add.at(norms, rows, per_element[cols])
    return norms


def producer_weight_norms(space: Space, index: GraphIndex, p: int) -> np.ndarray:
    """Per unit: the L1 (p=1) or squared L2 (p=2) norm of its producers' output weights."""
    norms = np.zeros(space.n)
    producers = set(space.producers)
    for cut in space.slices:
        if cut.node in producers and cut.input_index == 1:
            node = index.node(cut.node)
            weight = np.moveaxis(index.const(node.input[1]).astype(np.float64), cut.axis, 0)
            weight = np.moveaxis(weight.reshape(cut.repeats, space.n, -1), 0, 1).reshape(space.n, -1)  # an LSTM's gate rows
            norms += np.abs(weight).sum(axis=1) if p == 1 else (weight**2).sum(axis=1)
    return norms


def zca_scores(cov: np.ndarray) -> np.ndarray:
    """Per element, ([S^1/2]_ii)^2: the variance of unit i shared with its own ZCA-whitened
    counterpart (the cross-covariance of ZCA-whitened and original variables is S^1/2), i.e.
    what is left of the unit after a symmetric decorrelation that is not rescaled to unit
    variance. Redundant units share their energy and score low (docs/design.md)."""
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    root = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
    return np.diag(root) ** 2


def _by_score(score: np.ndarray) -> np.ndarray:
    return np.argsort(-score, kind="stable")


def score_space(
    space: Space,
    stats: dict[str, SiteStats],
    index: GraphIndex,
    method: str = "snp",
    order: str = DEFAULT_ORDER,
    seed: int = 0,
) -> SpaceScore:
    """Order a space's units and give each its energy, for the chosen method; its locked units
    (always kept) go first, and the planner keeps at least that many."""
    score = _ordered(space, stats, index, method, order, seed)
    if not space.locked:
        return score
    first = np.isin(score.order, sorted(space.locked))
    moved = np.r_[np.flatnonzero(first), np.flatnonzero(~first)]
    return SpaceScore(space.id, score.order[moved], score.energy[moved], score.standardised, locked=int(first.sum()))


def _ordered(space: Space, stats: dict[str, SiteStats], index: GraphIndex, method: str, order: str, seed: int) -> SpaceScore:
    n, block = space.n, unit_block(space)

    def per_unit(values: np.ndarray) -> np.ndarray:
        return values.reshape(n, block).sum(axis=1)

    if method == "random":
        rng = np.random.default_rng([seed, space.id])
        return SpaceScore(space.id, rng.permutation(n), np.ones(n))
    if method in ("l1", "l2", "lsq"):
        norms = producer_weight_norms(space, index, 1 if method == "l1" else 2)
        units = _by_score(norms)
        return SpaceScore(space.id, units, norms[units])
    if method == "wanda":
        # Wanda-sp: |W| x ||X|| per input unit (RMS activation times L1 norm of the weights reading it)
        score = per_unit(np.sqrt(space_second_moment(space, stats)) * consumer_weight_norms(space, index, power=1))
        units = _by_score(score)
        return SpaceScore(space.id, units, score[units])
    if method == "snp" and order == "obs":
        pairs = site_grams(space, stats, block, unit_major, lambda c: consumer_weight_rows(space, index, c))
        if pairs and sum(np.trace(g) * np.trace(c) for c, g in pairs) > 0:
            units, energy = obs_order(pairs, n, block)
            return SpaceScore(space.id, units, energy)
        order = "pivoted"  # no weight reads it (or nothing varies): the activations' own energy
    cov = space_covariance(space, stats)
    if method == "fluct":
        # FLAP: fluctuation (variance) of the input unit x squared norm of the weights reading it
        fluctuation = per_unit(np.diag(cov) * consumer_weight_norms(space, index))
        units = _by_score(fluctuation)
        return SpaceScore(space.id, units, fluctuation[units], standardised=True)
    variance = per_unit(np.diag(cov))
    if method == "variance":
        units = _by_score(variance)
        return SpaceScore(space.id, units, variance[units])
    if order in ("pivoted", "weighted"):
        if order == "weighted":
            scale = np.sqrt(consumer_weight_norms(space, index))
            cov = cov * np.outer(scale, scale)
        if not np.trace(cov) > 0:
            return SpaceScore(space.id, np.arange(n), np.zeros(n))
        units, energy = pivoted_order(cov) if block == 1 else block_pivoted_order(cov, block)
        return SpaceScore(space.id, units, energy)
    if order == "variance":
        units = _by_score(variance)
    elif order == "zca":
        units = _by_score(per_unit(zca_scores(cov)))
    elif order == "residual":
        # ||W_i||^2 / [C^-1]_ii: output error of removing unit i alone with LS recovery
        inv_diag = np.diag(spd_inverse(regularised(cov, RIDGE)))
        units = _by_score(per_unit(consumer_weight_norms(space, index) / inv_diag))
    else:
        raise ValueError(f"unknown order '{order}'")
    if not np.trace(cov) > 0:
        return SpaceScore(space.id, units, np.zeros(n))
    return SpaceScore(space.id, units, block_cholesky_energy(cov, units, block))
