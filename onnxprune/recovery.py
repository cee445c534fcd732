"""Least-squares recovery: the pruned units as an affine function of the kept ones (DESIGN §2)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .analyse import Analysis, Space
from .plan import Plan, SpacePlan
from .score import RIDGE
from .stats import CrossMoments, SiteStats, regularised


@dataclass
class Recovery:
    """x_P ~= B x_K + b0 at one site, fitted on the calibration activations.

    A sequential fit (DESIGN §2) also maps the kept units of the pruned model onto the
    original's, x_K ~= M x~_K + m0; `kept_weights` None means M = I, m0 = 0 (one-shot)."""

    weights: np.ndarray  # B, |P| x |K|
    offset: np.ndarray  # b0, |P|
    keep: np.ndarray  # positions of the kept units on the site tensor
    prune: np.ndarray  # positions of the pruned units
    kept_weights: np.ndarray | None = None  # M, |K| x |K|
    kept_offset: np.ndarray | None = None  # m0, |K|

    @property
    def changes_kept(self) -> bool:
        return self.kept_weights is not None


def mean_recovery(stats: SiteStats, keep: np.ndarray, prune: np.ndarray) -> Recovery:
    """FLAP's bias compensation: a pruned unit is replaced by its calibration mean."""
    return Recovery(np.zeros((len(prune), len(keep))), stats.mean()[prune], keep, prune)


def fit_recovery(stats: SiteStats, keep: np.ndarray, prune: np.ndarray) -> Recovery:
    """B = S_PK S_KK^-1 on the centred covariance (solve, never invert); b0 = mu_P - B mu_K.

    `keep` and `prune` are positions (columns) of the site's statistics.
    """
    cov, mean = stats.covariance(), stats.mean()
    if len(keep) == 0:
        return Recovery(np.zeros((len(prune), 0)), mean[prune], keep, prune)
    s_kk = regularised(cov[np.ix_(keep, keep)], RIDGE)
    s_kp = cov[np.ix_(keep, prune)]
    try:
        solution = sla.cho_solve(sla.cho_factor(s_kk, check_finite=False), s_kp, check_finite=False)
    except np.linalg.LinAlgError:  # not positive definite: round-off of a Gram of lower rank than its units
        solution = minimum_norm_solve(s_kk, s_kp)
    weights = solution.T
    return Recovery(weights, mean[prune] - weights @ mean[keep], keep, prune)


GRAM_PRECISION = 1e-6  # eigenvalues below this share of the largest are the float32 Grams' round-off


def minimum_norm_solve(s_kk: np.ndarray, s_kp: np.ndarray) -> np.ndarray:
    """S_KK^+ S_KP on the directions S_KK measures above its round-off: the kept units of a site
    whose rows repeat (learned queries, a fixed decoder prompt) span fewer dimensions than they
    count, and inverting the round-off in the others blew the recovery's weights up 3000-fold."""
    values, vectors = np.linalg.eigh((s_kk + s_kk.T) / 2)
    measured = values > GRAM_PRECISION * max(values.max(), np.finfo(float).tiny)
    return vectors[:, measured] @ ((vectors[:, measured].T @ s_kp) / values[measured][:, None])


# Shrinkage toward the one-shot solution, relative to the mean variance of the pruned model's
# kept units; inf is the one-shot fit itself. The value is chosen per site on held-out rows.
SHRINKAGE = (0.0, 0.01, 0.1, 1.0, 10.0, np.inf)
DEFAULT_SHRINKAGE = 1.0  # when no held-out rows are given


@dataclass
class SequentialFit:
    """What the sequential fit chose at one (space, site): shrinkage and held-out errors (the
    consumer-weighted residual energy, DESIGN §2) of the one-shot and the chosen solution."""

    shrinkage: float
    error_one_shot: float | None
    error: float | None


def one_shot_map(recovery: Recovery | None, k: int, n_prune: int) -> np.ndarray:
    """U1 (k x (k + |P|)): identity on the kept units, the one-shot B^T on the pruned ones."""
    pruned = np.zeros((k, n_prune)) if recovery is None else recovery.weights.T
    return np.hstack([np.eye(k), pruned])


class HeldoutScorer:
    """E ||V^T (x_o - U^T x~ - c)||^2 on held-out moments (centred parts plus the mean residual);
    the parts that do not depend on U (V^T S_oo V, S~o V) are computed once per site."""

    def __init__(self, held: CrossMoments, metric: np.ndarray):
        self.held, self.metric = held, metric
        self.constant = float(np.sum(metric * (held.cov_oo @ metric)))
        self.cross = held.cov_po @ metric  # k x m

    def error(self, uv: np.ndarray, predicted_mean: np.ndarray) -> float:
        """`uv` = U V, `predicted_mean` = U^T mean(x~) + c on the held-out rows. A negative
        estimate of these squares (an ill-conditioned map on few held-out rows: U V amplifies
        the float32 moments' rounding, and once read -4e5 where one-shot's error was 10^3) is
        not a measurement: it counts as infinite, so that candidate is never chosen."""
        bias = (self.held.mean_o - predicted_mean) @ self.metric
        explained = np.sum(uv * (self.held.cov_pp @ uv))
        error = self.constant - 2 * np.sum(uv * self.cross) + explained + bias @ bias
        return float(error) if explained >= 0 and error >= 0 else np.inf

    def error_of(self, u: np.ndarray, c: np.ndarray) -> float:
        return self.error(u @ self.metric, u.T @ self.held.mean_p + c)


class ShrunkSolutions:
    """U(l) = (S~ + l s I)^-1 (S~o + l s U1) for every shrinkage l from one eigendecomposition
    S~ = Q diag(e) Q^T: U(l) = Q Y(l), Y(l) = (Q^T S~o + l s Q^T U1) / (e + l s), kept in the
    eigenbasis so that scoring a shrinkage never forms the k x n product Q Y (DESIGN §2)."""

    def __init__(self, cal: CrossMoments, u1: np.ndarray):
        k = len(u1)
        s_pp = cal.cov_pp
        self.scale = max(np.trace(s_pp) / k, np.finfo(float).tiny)
        values, self.vectors = np.linalg.eigh((s_pp + s_pp.T) / 2)
        self.values = np.maximum(values, 0) + RIDGE * self.scale
        self.target = self.vectors.T @ cal.cov_po
        # Q^T U1 with U1 = [I, B^T]: the identity block is Q^T itself
        self.prior = np.hstack([self.vectors.T, self.vectors.T @ u1[:, k:]])

    def rotated(self, lam: float, target: np.ndarray, prior: np.ndarray) -> np.ndarray:
        """Y(l) applied to any right factor: (target + l s prior) / (e + l s)."""
        return (target + lam * self.scale * prior) / (self.values + lam * self.scale)[:, None]

    def solution(self, lam: float) -> np.ndarray:
        return self.vectors @ self.rotated(lam, self.target, self.prior)

    def scorer_inputs(self, metric: np.ndarray, means: tuple[np.ndarray, ...]) -> Callable[[float], tuple[np.ndarray, list[np.ndarray]]]:
        """For each l: U(l) V and U(l)^T m for each mean m, from products formed once."""
        target_v, prior_v = self.target @ metric, self.prior @ metric
        rotated_means = [self.vectors.T @ m for m in means]

        def at(lam: float) -> tuple[np.ndarray, list[np.ndarray]]:
            uv = self.vectors @ self.rotated(lam, target_v, prior_v)
            weights = [m / (self.values + lam * self.scale) for m in rotated_means]  # Y(l)^T Q^T m without Y(l)
            return uv, [self.target.T @ w + lam * self.scale * (self.prior.T @ w) for w in weights]
        return at


def fit_sequential(cal: CrossMoments, keep: np.ndarray, prune: np.ndarray, one_shot: Recovery | None,
                   held: CrossMoments | None = None, metric: np.ndarray | None = None, kind: str = "lsq",
                   shrinkage: float | None = None) -> tuple[Recovery, SequentialFit]:
    """x_o ~= U^T x~_K + c from the pruned model's kept units to the original's units at one site
    (moments restricted to this space's columns: k kept on the pruned side, K then P on the
    original's), U = (S~ + l s I)^-1 (S~o + l s U1), shrunk toward the one-shot U1 by l, chosen
    on held-out moments when given, unless `shrinkage` fixes it (DESIGN §2, sequential recovery). `kind` "mean" only
    re-centres (FLAP's compensation with the pruned model's means)."""
    k = len(keep)
    u1 = one_shot_map(one_shot if kind == "lsq" else None, k, len(prune))
    c1 = np.concatenate([np.zeros(k), one_shot.offset if one_shot is not None else cal.mean_o[k:]])
    scorer = HeldoutScorer(held, metric) if held is not None and metric is not None and held.count else None
    solver = ShrunkSolutions(cal, u1) if kind == "lsq" and k else None
    if solver is None:
        lambdas: tuple[float, ...] = (np.inf,)
    elif shrinkage is not None:
        lambdas = (shrinkage,)
    else:
        lambdas = SHRINKAGE if scorer is not None else (DEFAULT_SHRINKAGE,)

    def offset(lam: float, u: np.ndarray) -> np.ndarray:
        """Infinite shrinkage is the one-shot fold as it is (lsq); otherwise c re-centres U."""
        return c1 if np.isinf(lam) and kind == "lsq" else cal.mean_o - u.T @ cal.mean_p

    errors: dict[float, float] = {}
    if scorer is not None:
        at = solver.scorer_inputs(metric, (held.mean_p, cal.mean_p)) if solver is not None else None
        for lam in lambdas:
            if np.isinf(lam):
                errors[lam] = scorer.error_of(u1, offset(lam, u1))
            else:  # U^T m~_held + c with c = m_o - U^T m~_cal, from the eigenbasis
                uv, (held_mean, cal_mean) = at(lam)
                errors[lam] = scorer.error(uv, held_mean + cal.mean_o - cal_mean)
    chosen = min(lambdas, key=lambda lam: (errors.get(lam, 0.0), -lam))  # ties: the stronger shrinkage
    u = u1 if np.isinf(chosen) else solver.solution(chosen)
    c = offset(chosen, u)
    # float32 copies, not views of U: every fitted site's maps stay alive until the final rewrite
    recovery = Recovery(np.array(u[:, k:].T, dtype=np.float32), c[k:], keep, prune,
                        kept_weights=np.array(u[:, :k].T, dtype=np.float32), kept_offset=c[:k])
    one_shot_error = None
    if errors:  # the one-shot fold as it is: U1 with its own offsets (0 on K, b0 on P)
        one_shot_error = errors[np.inf] if kind == "lsq" and np.inf in errors else scorer.error_of(u1, c1)
    return recovery, SequentialFit(float(chosen), one_shot_error, errors.get(chosen))


def state_recoveries(space: Space, space_plan: SpacePlan, stats: dict[str, SiteStats], fit) -> dict[tuple[int, str, int], Recovery]:
    """Per direction d of a recurrent op that reads its own hidden units back (through R), the
    pruned units of d from the kept units of d only (h_(t-1) of one direction is all its R sees),
    keyed (space, site, d), with `keep`/`prune` as hidden-unit indices (R's columns)."""
    found = {}
    keep, prune = np.sort(space_plan.keep), np.sort(space_plan.prune)
    for read in space.recurrent_reads:
        placement = space.tensors[read.site]
        rows, cols = placement.unit_major()
        column = np.empty(len(rows), dtype=np.int64)
        column[rows] = cols
        directions = placement.repeats * placement.block
        for d in range(directions):
            recovery = fit(stats[read.site], column[keep * directions + d], column[prune * directions + d])
            found[(space.id, read.site, d)] = dataclasses.replace(recovery, keep=keep, prune=prune)
    return found


def fit_recoveries(analysis: Analysis, plan: Plan, stats: dict[str, SiteStats], kind: str = "lsq",
                   within_space: bool = False) -> dict[tuple, Recovery]:
    """One recovery per (pruned space, site): least squares (`lsq`) or the pruned units' means
    (`mean`, FLAP's bias compensation); and per (space, site, direction) for a recurrent op's own
    hidden units (`state_recoveries`). A site that holds several spaces' units (a Concat, a
    channel shuffle) predicts each space's pruned units from every channel left there, whoever
    it belongs to; `within_space` restricts it to the space's own kept units (the prior of the
    sequential fit, whose columns are the space's)."""
    fit = fit_recovery if kind == "lsq" else mean_recovery
    left = {} if within_space else _left_at_sites(analysis, plan)
    recoveries: dict = {}
    for space in analysis.prunable:
        space_plan = plan.spaces[space.id]
        if not len(space_plan.prune):
            continue
        recoveries.update(state_recoveries(space, space_plan, stats, fit))
        for tensor in space.sites:
            placement = space.tensors[tensor]
            prune = placement.element_positions_of(space_plan.prune)
            keep = left.get(tensor)
            if keep is None or stats[tensor].count < JOINT_ROWS_PER_UNIT * len(keep):  # too few rows for that many regressors
                keep = placement.element_positions_of(space_plan.keep)
            if len(prune):
                recoveries[(space.id, tensor)] = fit(stats[tensor], keep, prune)
    return recoveries


JOINT_ROWS_PER_UNIT = 4  # a shared site's fit uses every channel left there only with this many rows per channel


def _left_at_sites(analysis: Analysis, plan: Plan) -> dict[str, np.ndarray]:
    """Per shared site (`shared_sites`): the element positions no space prunes."""
    left = {}
    for tensor, owners in shared_sites(analysis).items():
        removed = [s.tensors[tensor].element_positions_of(plan.spaces[s.id].prune) for s in owners if s.id in plan.spaces]
        left[tensor] = np.setdiff1d(np.arange(owners[0].tensors[tensor].size), np.concatenate([np.zeros(0, dtype=np.int64), *removed]))
    return left


def shared_site(owners: list[Space], tensor: str) -> bool:
    """Whether the site holds units of several spaces, or channels of none besides one space's."""
    if len(owners) != 1:
        return len(owners) > 1
    placement = owners[0].tensors[tensor]
    return placement.count() * placement.block != placement.size


def shared_sites(analysis: Analysis) -> dict[str, list[Space]]:
    """The sites of the prunable spaces that another space or unowned channels share, with the
    spaces on each (a Concat, a channel shuffle)."""
    owners: dict[str, list[Space]] = {}
    for space in analysis.prunable:
        for tensor in space.sites:
            owners.setdefault(tensor, []).append(space)
    return {tensor: spaces for tensor, spaces in owners.items() if shared_site(spaces, tensor)}
