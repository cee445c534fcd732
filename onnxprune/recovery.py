"""Least-squares recovery: the pruned units as an affine function of the kept ones (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .analyse import Analysis
from .plan import Plan
from .score import RIDGE
from .stats import CrossMoments, SiteStats


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
    s_kk = cov[np.ix_(keep, keep)]
    ridge = RIDGE * max(np.trace(s_kk) / len(keep), np.finfo(float).tiny)
    s_kk = s_kk + ridge * np.eye(len(keep))
    s_kp = cov[np.ix_(keep, prune)]
    try:
        solution = sla.cho_solve(sla.cho_factor(s_kk, check_finite=False), s_kp, check_finite=False)
    except np.linalg.LinAlgError:
        solution = sla.lstsq(s_kk, s_kp, check_finite=False)[0]
    weights = solution.T
    return Recovery(weights, mean[prune] - weights @ mean[keep], keep, prune)


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


def heldout_error(u: np.ndarray, c: np.ndarray, held: CrossMoments, metric: np.ndarray) -> float:
    """E ||V^T (x_o - U^T x~ - c)||^2 on held-out moments (centred parts plus the mean residual)."""
    uv = u @ metric
    bias = (held.mean_o - u.T @ held.mean_p - c) @ metric
    spread = np.sum(metric * (held.cov_oo @ metric)) - 2 * np.sum(uv * (held.cov_po @ metric)) + np.sum(uv * (held.cov_pp @ uv))
    return float(spread + bias @ bias)


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
    if kind != "lsq" or k == 0:
        candidates = {np.inf: u1}
    else:
        s_pp = cal.cov_pp
        scale = max(np.trace(s_pp) / k, np.finfo(float).tiny)
        values, vectors = np.linalg.eigh((s_pp + s_pp.T) / 2)
        values = np.maximum(values, 0) + RIDGE * scale
        rotated_target, rotated_prior = vectors.T @ cal.cov_po, vectors.T @ u1
        if shrinkage is not None:
            lambdas: tuple[float, ...] = (shrinkage,)
        else:
            lambdas = SHRINKAGE if held is not None and metric is not None else (DEFAULT_SHRINKAGE,)
        candidates = {}
        for lam in lambdas:
            if np.isinf(lam):
                candidates[lam] = u1
            else:  # one eigendecomposition serves every shrinkage
                candidates[lam] = vectors @ ((rotated_target + lam * scale * rotated_prior) / (values + lam * scale)[:, None])
    offsets = {lam: cal.mean_o - u.T @ cal.mean_p for lam, u in candidates.items()}
    c1 = np.concatenate([np.zeros(k), one_shot.offset if one_shot is not None else cal.mean_o[k:]])
    if kind == "lsq" and np.inf in candidates:  # infinite shrinkage is the one-shot fold as it is
        offsets[np.inf] = c1
    errors = {}
    if held is not None and metric is not None and held.count:
        errors = {lam: heldout_error(u, offsets[lam], held, metric) for lam, u in candidates.items()}
    chosen = min(candidates, key=lambda lam: (errors.get(lam, 0.0), -lam))  # ties: the stronger shrinkage
    u, c = candidates[chosen], offsets[chosen]
    recovery = Recovery(u[:, k:].T, c[k:], keep, prune, kept_weights=u[:, :k].T, kept_offset=c[:k])
    one_shot_error = None
    if errors:  # the one-shot fold as it is: U1 with its own offsets (0 on K, b0 on P)
        one_shot_error = errors[np.inf] if kind == "lsq" and np.inf in errors else heldout_error(u1, c1, held, metric)
    return recovery, SequentialFit(float(chosen), one_shot_error, errors.get(chosen))


def fit_recoveries(analysis: Analysis, plan: Plan, stats: dict[str, SiteStats], kind: str = "lsq") -> dict[tuple[int, str], Recovery]:
    """One recovery per (pruned space, site), on the site's columns of that space: least squares
    (`lsq`) or the pruned units' means (`mean`, FLAP's bias compensation)."""
    fit = fit_recovery if kind == "lsq" else mean_recovery
    recoveries = {}
    for space in analysis.prunable:
        space_plan = plan.spaces[space.id]
        if not len(space_plan.prune):
            continue
        for tensor in space.sites:
            placement = space.tensors[tensor]
            keep, prune = placement.element_positions_of(space_plan.keep), placement.element_positions_of(space_plan.prune)
            if len(prune):
                recoveries[(space.id, tensor)] = fit(stats[tensor], keep, prune)
    return recoveries
