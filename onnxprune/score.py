"""Scoring: an order of each space's units (most important first) and the energy each unit
adds in that order. For SNP the energy is D_i of the constant-first Cholesky/LDL (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .analyse import Space
from .graph import GraphIndex
from .stats import SiteStats

ORDERS = ("pivoted", "weighted", "variance", "residual")
METHODS = ("snp", "lsq", "fluct", "l1", "l2", "variance", "random")
# How each method compensates the pruned units: least squares, their mean (FLAP), or not at all.
RECOVERY = {"snp": "lsq", "lsq": "lsq", "fluct": "mean"}
STATS_METHODS = frozenset({"snp", "lsq", "fluct", "variance"})
RIDGE = 1e-10  # relative to the mean unit variance: keeps exactly redundant units finite


@dataclass
class SpaceScore:
    """Units of one space in pruning order (kept first) with their energies in that order."""

    space_id: int
    order: np.ndarray
    energy: np.ndarray
    standardised: bool = False  # FLAP-style: threshold z-scores of the energy instead of tail fractions

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


def regularised(cov: np.ndarray) -> np.ndarray:
    n = len(cov)
    ridge = RIDGE * max(np.trace(cov) / max(n, 1), np.finfo(float).tiny)
    return cov + ridge * np.eye(n)


def space_covariance(space: Space, stats: dict[str, SiteStats]) -> np.ndarray:
    """Joint covariance of a space: the sum over its sites of each site's block for these units."""
    cov = np.zeros((space.n, space.n))
    for tensor in space.sites:
        units, positions = space.tensors[tensor].unit_positions()
        block = stats[tensor].covariance()[np.ix_(positions, positions)]
        np.add.at(cov, np.ix_(units, units), block)
    return cov


def cholesky_energy(cov: np.ndarray, order: np.ndarray) -> np.ndarray:
    """D_i = R_ii^2 of the Cholesky factor of the (regularised) covariance in `order`."""
    r = sla.cholesky(regularised(cov)[np.ix_(order, order)], lower=False, check_finite=False)
    return np.diag(r) ** 2


def pivoted_order(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy pivoted Cholesky (LAPACK dpstrf): next is the unit with the largest residual."""
    n = len(cov)
    if not np.trace(cov) > 0:
        return np.arange(n), np.zeros(n)
    factor, piv, rank, _ = sla.lapack.dpstrf(regularised(cov), lower=0)
    order = piv[:n] - 1
    energy = np.zeros(n)
    energy[:rank] = np.diag(factor)[:rank] ** 2
    return order, energy


def consumer_weight_norms(space: Space, index: GraphIndex) -> np.ndarray:
    """Per unit: sum over consumers of the squared norm of the weights that read it."""
    norms = np.zeros(space.n)
    for consumer in space.consumers:
        placement = space.tensors[consumer.site]
        weight = index.const(index.node(consumer.node).input[consumer.weight_index]).astype(np.float64)
        per_position = (np.moveaxis(weight, consumer.in_axis, 0).reshape(placement.width, -1) ** 2).sum(axis=1)
        units, positions = placement.unit_positions()
        np.add.at(norms, units, per_position[positions])
    return norms


def producer_weight_norms(space: Space, index: GraphIndex, p: int) -> np.ndarray:
    """Per unit: the L1 (p=1) or squared L2 (p=2) norm of its producers' output weights."""
    norms = np.zeros(space.n)
    producers = set(space.producers)
    for cut in space.slices:
        if cut.node in producers and cut.input_index == 1:
            node = index.node(cut.node)
            weight = np.moveaxis(index.const(node.input[1]).astype(np.float64), cut.axis, 0).reshape(space.n, -1)
            norms += np.abs(weight).sum(axis=1) if p == 1 else (weight**2).sum(axis=1)
    return norms


def _by_score(score: np.ndarray) -> np.ndarray:
    return np.argsort(-score, kind="stable")


def score_space(
    space: Space,
    stats: dict[str, SiteStats],
    index: GraphIndex,
    method: str = "snp",
    order: str = "pivoted",
    seed: int = 0,
) -> SpaceScore:
    """Order a space's units and give each its energy, for the chosen method."""
    if method == "random":
        rng = np.random.default_rng([seed, space.id])
        return SpaceScore(space.id, rng.permutation(space.n), np.ones(space.n))
    if method in ("l1", "l2", "lsq"):
        norms = producer_weight_norms(space, index, 1 if method == "l1" else 2)
        units = _by_score(norms)
        return SpaceScore(space.id, units, norms[units])
    cov = space_covariance(space, stats)
    if method == "fluct":
        # FLAP: fluctuation (variance) of the input unit x squared norm of the weights reading it
        fluctuation = np.diag(cov) * consumer_weight_norms(space, index)
        units = _by_score(fluctuation)
        return SpaceScore(space.id, units, fluctuation[units], standardised=True)
    if method == "variance":
        units = _by_score(np.diag(cov))
        return SpaceScore(space.id, units, np.diag(cov)[units])
    if order == "pivoted":
        units, energy = pivoted_order(cov)
        return SpaceScore(space.id, units, energy)
    if order == "weighted":
        scale = np.sqrt(consumer_weight_norms(space, index))
        units, energy = pivoted_order(cov * np.outer(scale, scale))
        return SpaceScore(space.id, units, energy)
    if order == "variance":
        units = _by_score(np.diag(cov))
    elif order == "residual":
        # ||W_i||^2 / [C^-1]_ii: output error of removing unit i alone with LS recovery
        inv_diag = np.diag(sla.cho_solve(sla.cho_factor(regularised(cov)), np.eye(space.n)))
        units = _by_score(consumer_weight_norms(space, index) / inv_diag)
    else:
        raise ValueError(f"unknown order '{order}'")
    if not np.trace(cov) > 0:
        return SpaceScore(space.id, units, np.zeros(space.n))
    return SpaceScore(space.id, units, cholesky_energy(cov, units))
