"""`--order obs`: greedy backward elimination of a space's units by the exact output error of the
least-squares recovery (Optimal Brain Surgeon on whole input units, docs/design.md).

At a site with unit covariance S and consumers' weight Gram G = sum_c W_c^T W_c, pruning the set
P with the recovery x_P ~ B x_K costs tr(G_PP S_P|K) of output energy. Removing R from the kept
set K, with the weights already compensated for what was removed before (G~) and the precision
L = S_KK^-1, costs tr(G~_RR L_RR^-1); both are updated in closed form, so every step is exact and
the energies sum to the total output energy tr(G S), like the `weighted` order's."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import scipy.linalg as sla

from .analyse import Space
from .placement import expand_blocks
from .stats import SiteStats, regularised, spd_inverse

RIDGE = 1e-8  # relative to the mean unit variance: exact copies stay invertible, far from round-off
STEPS = 256  # removals per space at most: larger spaces remove ceil(n / STEPS) units per step


def site_grams(space: Space, stats: dict[str, SiteStats], block: int, unit_major: Callable,
               weight_rows: Callable) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per site with weight consumers: (S, G) in the space's unit-major elements
    (`weight_rows(consumer)`: its weights, one row per element of the site's unit axis)."""
    size = space.n * block
    weights: dict[str, list[np.ndarray]] = defaultdict(list)
    for consumer in space.consumers:
        weights[consumer.site].append(weight_rows(consumer))
    pairs = []
    for tensor in space.sites:
        if tensor not in weights:
            continue
        rows, cols = unit_major(space.tensors[tensor], block)
        cov, gram = np.zeros((size, size)), np.zeros((size, size))
        np.add.at(cov, np.ix_(rows, rows), stats[tensor].covariance()[np.ix_(cols, cols)])
        per_element = np.concatenate(weights[tensor], axis=1)[cols]
        np.add.at(gram, np.ix_(rows, rows), per_element @ per_element.T)
        pairs.append((cov, gram))
    return pairs


def _unit_costs(gram: np.ndarray, precision: np.ndarray, block: int) -> np.ndarray:
    """Per alive unit, the output error of removing it alone now: tr(G~_uu L_uu^-1)."""
    if block == 1:
        return np.diag(gram) / np.diag(precision)
    e = np.arange(len(gram)).reshape(-1, block)
    g = gram[e[:, :, None], e[:, None, :]]
    p = precision[e[:, :, None], e[:, None, :]]
    return np.trace(np.linalg.solve(p, g), axis1=1, axis2=2)


def obs_order(pairs: list[tuple[np.ndarray, np.ndarray]], n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, energy): units kept first; energy[j] is the output error that removing order[j]
    added when it was removed (a step of several units shares the step's exact error among
    them in proportion to their single-unit costs)."""
    grams = [g.copy() for _, g in pairs]
    precisions = [spd_inverse(regularised(c, RIDGE)) for c, _ in pairs]
    alive = np.arange(n)
    removed, energies = [], []
    step = max(1, -(-n // STEPS))
    while alive.size:
        costs = sum(_unit_costs(g, p, block) for g, p in zip(grams, precisions, strict=True))
        costs = np.maximum(np.asarray(costs, dtype=float), 0.0)
        r = min(step, alive.size)
        pick = np.argsort(costs, kind="stable")[:r]
        keep = np.setdiff1d(np.arange(alive.size), pick)
        out, stay = expand_blocks(pick, block), expand_blocks(keep, block)
        error = 0.0
        for i, (g, p) in enumerate(zip(grams, precisions, strict=True)):
            p_rr = p[np.ix_(out, out)]
            factor = sla.cho_factor(p_rr, check_finite=False)
            t = sla.cho_solve(factor, p[np.ix_(out, stay)], check_finite=False)  # -B_R: the recovery
            g_rr, g_rk = g[np.ix_(out, out)], g[np.ix_(out, stay)]
            error += float(np.trace(sla.cho_solve(factor, g_rr, check_finite=False)))
            cross = g_rk.T @ t
            grams[i] = g[np.ix_(stay, stay)] - cross - cross.T + t.T @ g_rr @ t
            precisions[i] = p[np.ix_(stay, stay)] - p[np.ix_(stay, out)] @ t
        share = costs[pick] / costs[pick].sum() if costs[pick].sum() > 0 else np.full(r, 1.0 / r)
        removed.extend(alive[pick].tolist())
        energies.extend((max(error, 0.0) * share).tolist())
        alive = alive[keep]
    return np.array(removed[::-1], dtype=np.int64), np.array(energies[::-1])
