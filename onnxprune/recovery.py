"""Least-squares recovery: the pruned units as an affine function of the kept ones (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from .score import RIDGE
from .stats import SiteStats


@dataclass
class Recovery:
    """x_P ~= B x_K + b0 at one site, fitted on the calibration activations."""

    weights: np.ndarray  # B, |P| x |K|
    offset: np.ndarray  # b0, |P|
    keep: np.ndarray  # positions of the kept units on the site tensor
    prune: np.ndarray  # positions of the pruned units


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
