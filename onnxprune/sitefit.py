"""The sequential pass's fits at one site: a space's own site, or a site several spaces share
(a Concat, a channel shuffle: one map from every channel the pruned model keeps there to every
channel of the original), from the moments of the pruned run (docs/design.md, "Sequential
(error-correcting) recovery")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .analyse import Space
from .graph import GraphIndex
from .plan import SpacePlan
from .rechoose import SharedColumns
from .recovery import Recovery, SequentialFit, fit_sequential, shared_site
from .score import consumer_metric
from .stats import CrossMoments

NONE = np.zeros(0, dtype=np.int64)


@dataclass
class SiteColumns:
    """One space's columns at a site: kept and pruned positions on the original's tensor, and
    where the kept ones sit on the pruned model's (narrower) tensor."""

    keep: np.ndarray
    prune: np.ndarray
    pruned_keep: np.ndarray


def site_columns(space: Space, tensor: str, space_plan: SpacePlan, removed: dict[str, np.ndarray]) -> SiteColumns:
    placement = space.tensors[tensor]
    keep, prune = placement.element_positions_of(space_plan.keep), placement.element_positions_of(space_plan.prune)
    gone = removed.get(tensor, NONE)
    return SiteColumns(keep, prune, keep - np.searchsorted(gone, keep))


def site_prior(recoveries: list[Recovery | None], keep: np.ndarray, prune: np.ndarray) -> Recovery:
    """The spaces' one-shot recoveries at a shared site as one map from all kept channels to all
    pruned ones (each space's rows on its own kept columns, zero elsewhere)."""
    weights, offset = np.zeros((len(prune), len(keep))), np.zeros(len(prune))
    for recovery in recoveries:
        if recovery is None or not len(recovery.prune):
            continue
        rows, cols = np.searchsorted(prune, recovery.prune), np.searchsorted(keep, recovery.keep)
        weights[np.ix_(rows, cols)] = recovery.weights
        offset[rows] = recovery.offset
    return Recovery(weights, offset, keep, prune)


@dataclass
class SiteFits:
    """Fits for any plan: `run_removed` (per tensor, the elements the pruned run did not show)
    places the kept channels on the pruned model's tensors."""

    spaces: list[Space]
    index: GraphIndex
    kind: str = "lsq"
    shrinkage: float | None = None
    owners: dict[str, list[Space]] = field(init=False)  # per site, the spaces read there
    shared: set[str] = field(init=False)  # the sites fitted as one map

    def __post_init__(self) -> None:
        self.owners = {}
        for space in self.spaces:
            for tensor in space.sites:
                self.owners.setdefault(tensor, []).append(space)
        self.shared = {t for t, spaces in self.owners.items() if shared_site(spaces, t)}

    def space_site(self, space: Space, tensor: str, space_plan: SpacePlan, prior: Recovery | None, cal: CrossMoments,
                   held: CrossMoments | None, run_removed: dict[str, np.ndarray]) -> tuple[Recovery, SequentialFit]:
        """One space's fit at a site of its own, for the given keep set."""
        columns = site_columns(space, tensor, space_plan, run_removed)
        return self._fit(space, tensor, columns, prior, cal, held)

    def shared_site(self, tensor: str, spaces_plan: dict[int, SpacePlan], one_shot: dict, cal: CrossMoments,
                    held: CrossMoments | None, run_removed: dict[str, np.ndarray]) -> tuple[Recovery, SequentialFit]:
        """The one map at a shared site for a plan (under its first space; the others' consumers
        at the site are the same layers)."""
        owners = self.owners[tensor]
        prune = self.pruned_at(tensor, spaces_plan)
        keep = np.setdiff1d(np.arange(owners[0].tensors[tensor].size), prune)
        columns = SiteColumns(keep, prune, keep - np.searchsorted(run_removed.get(tensor, NONE), keep))
        prior = site_prior([one_shot.get((s.id, tensor)) for s in owners], keep, prune)
        return self._fit(owners[0], tensor, columns, prior, cal, held)

    def _fit(self, space: Space, tensor: str, columns: SiteColumns, prior: Recovery | None, cal: CrossMoments,
             held: CrossMoments | None) -> tuple[Recovery, SequentialFit]:
        """The fit of the original's kept then pruned columns from the pruned model's kept ones,
        weighed by the site's consumers (`space`'s)."""
        original_columns = np.concatenate([columns.keep, columns.prune])
        site_cal = cal.restrict(columns.pruned_keep, original_columns)
        site_held = None if held is None else held.restrict(columns.pruned_keep, original_columns)
        metric = consumer_metric(space, tensor, self.index, original_columns)
        return fit_sequential(site_cal, columns.keep, columns.prune, prior, site_held, metric, self.kind, self.shrinkage)

    def keep_set(self, space: Space, spaces_plan: dict[int, SpacePlan], one_shot: dict, moments: dict,
                 run_removed: dict[str, np.ndarray]) -> tuple[float | None, dict]:
        """A space's fits at its sites for a plan and their held-out error summed (None if
        nothing is held out); the fits at its own sites, to be reused (a shared site is fitted
        again once every space there is chosen)."""
        fits, errors = {}, []
        for t in space.sites:
            if t in self.shared:
                errors.append(self.shared_site(t, spaces_plan, one_shot, *moments[t], run_removed)[1].error)
            else:
                fits[(space.id, t)] = self.space_site(space, t, spaces_plan[space.id], one_shot.get((space.id, t)), *moments[t], run_removed)
                errors.append(fits[(space.id, t)][1].error)
        return (None if None in errors else float(sum(errors))), fits

    def shared_columns(self, space: Space, tensor: str, spaces_plan: dict[int, SpacePlan],
                       run_removed: dict[str, np.ndarray]) -> SharedColumns:
        """At a shared site: what the pruned run shows, and the channels other than the space's
        that stay with the plan so far (spaces not chosen yet count with their plan's units)."""
        placement = space.tensors[tensor]
        present = np.setdiff1d(np.arange(placement.size), run_removed.get(tensor, NONE))
        gone = np.concatenate([placement.element_positions_of(np.arange(space.n)), self.pruned_at(tensor, spaces_plan, without=space)])
        return SharedColumns(present, np.setdiff1d(present, gone))

    def pruned_at(self, tensor: str, spaces_plan: dict[int, SpacePlan], without: Space | None = None) -> np.ndarray:
        """The tensor's elements that the plan prunes (sorted), over every space holding it (one
        may pass through a site without reading it there), `without` one of them."""
        holders = [o for o in self.spaces if tensor in o.tensors and o is not without]
        return np.unique(np.concatenate([NONE, *(o.tensors[tensor].element_positions_of(spaces_plan[o.id].prune) for o in holders)]))
