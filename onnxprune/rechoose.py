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
from .score import RIDGE, consumer_metric, score_space, unit_block
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


def rechosen(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex, order: str) -> SpacePlan:
    """The `kept` units that best predict the original's activations at the space's sites from
    the pruned model's (every unit of the space shown there, as `unpruned` made it); `order`
    "self" ranks them by the pruned model's own redundancy instead (the score's order)."""
    if order == "self" or unit_block(space) > 1:
        stats = {t: site_stats(m.count, m.mean_p, m.cov_pp) for t, m in moments.items()}
        chosen = score_space(space, stats, index, "snp", "weighted").order[:kept]
    else:
        chosen = greedy_cross_selection(space, kept, moments, index)
    keep = np.sort(chosen)
    return SpacePlan(space.id, space.n, keep, np.setdiff1d(np.arange(space.n), keep))


def greedy_cross_selection(space: Space, kept: int, moments: dict[str, CrossMoments], index: GraphIndex) -> np.ndarray:
    """The space's `kept` units chosen by `forward_selection` on its sites' moments, the
    original's activations weighed by the consumers' weights (V V^T = sum W^T W)."""
    n = space.n
    covariances, crosses = [], []
    for tensor, m in moments.items():
        columns = space.tensors[tensor].element_positions_of(np.arange(n))  # unit j's column
        metric = consumer_metric(space, tensor, index, columns)
        s_po = m.cov_po[np.ix_(columns, columns)]
        covariances.append(m.cov_pp[np.ix_(columns, columns)])
        crosses.append(s_po @ metric if metric is not None else s_po)
    return forward_selection(covariances, crosses, kept, sorted(space.locked))


def forward_selection(covariances: list[np.ndarray], crosses: list[np.ndarray], kept: int, first: list[int] = ()) -> np.ndarray:
    """Greedy choice of `kept` columns (`first` ones first) of the pruned model's activations x~
    maximising sum over sites of tr(T_K^T S~_KK^-1 T_K), T = S~o V: the consumer-weighted energy
    of the original's activations that the chosen units explain, the sequential fit's objective
    (docs/design.md, "Re-choosing kept units"). Each pick adds ||t_j||^2 / s_jj of the moments
    left once the picked units are regressed out, which are then deflated by that unit."""
    residuals = [np.array(c, dtype=np.float64) for c in covariances]
    targets = [np.array(t, dtype=np.float64) for t in crosses]
    n = len(residuals[0])
    floor = RIDGE * max(sum(np.trace(r) for r in residuals) / n, np.finfo(float).tiny)
    alive = np.ones(n, dtype=bool)
    chosen: list[int] = []
    forced = list(first)
    for _ in range(kept):
        gain = np.zeros(n)
        for r, t in zip(residuals, targets, strict=True):
            variance = np.diag(r)
            gain += np.where(variance > floor, np.sum(t * t, axis=1) / np.maximum(variance, floor), 0.0)
        j = forced.pop(0) if forced else int(np.argmax(np.where(alive, gain, -np.inf)))
        chosen.append(j)
        alive[j] = False
        for r, t in zip(residuals, targets, strict=True):
            pivot = r[j, j]
            if pivot > floor:
                column = r[:, j] / pivot
                t -= np.outer(column, t[j])
                r -= np.outer(column, r[j])
    return np.array(chosen, dtype=np.int64)


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
