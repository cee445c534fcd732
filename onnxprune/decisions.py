"""The sequential pass's decisions: which units each space keeps (the plan, chosen again where
the pass can) and each site's refitted recovery, from the moments of the segment runs
(docs/design.md, "Sequential (error-correcting) recovery" and "Re-choosing kept units")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .analyse import Analysis, Space
from .boundary import BoundaryCache, RecoverySpill
from .placement import expand_blocks
from .plan import Plan, SpacePlan
from .rechoose import one_shot_prior, rechosen, unpruned
from .recovery import Recovery, SequentialFit
from .rewrite import cache_io_changes, pruned_spaces, removed_slots
from .sitefit import NONE, SiteFits
from .stats import CrossMoments


@dataclass
class SequentialResult:
    """The recoveries and, per (space name, site), what the fit chose."""

    recoveries: dict[tuple, Recovery]  # (space, site), and (space, site, direction) for R (recovery.state_recoveries)
    spill: RecoverySpill = field(default_factory=RecoverySpill)  # close() once the recoveries are folded
    fits: dict[tuple[str, str], SequentialFit] = field(default_factory=dict)
    segments: int = 0
    heldout_errors: tuple[float, float] | None = None  # the model's output error, one-shot and refitted
    samples: int = 0  # calibration samples the pass refitted on
    rejected: str | None = None  # why the refit was not kept although its held-out error was lower
    plan: Plan | None = None  # the plan the recoveries fold into (`rechoose` may change keep sets, never counts)
    rechosen: list[str] = field(default_factory=list)  # spaces whose kept units the pass chose again
    retried: str | None = None  # set on a pass with the plan's units run after a refused one with units chosen again

    @property
    def kept(self) -> bool:
        """Whether the refit was kept (no worse than one-shot on the held-out samples, and stable)."""
        if self.rejected is not None:
            return False
        return self.heldout_errors is None or self.heldout_errors[1] <= self.heldout_errors[0]

    def summary(self) -> dict:
        """For the report: shrinkage chosen per site and the held-out error ratio to one-shot."""
        rows = []
        for (space, site), fit in self.fits.items():
            ratio = fit.error / fit.error_one_shot if fit.error is not None and fit.error_one_shot else None
            ratio = ratio if ratio is None or np.isfinite(ratio) else None
            rows.append({"space": space, "site": site, "shrinkage": "inf" if np.isinf(fit.shrinkage) else fit.shrinkage,
                         "heldout_error_vs_one_shot": None if ratio is None else round(ratio, 4)})
        ratios = [r["heldout_error_vs_one_shot"] for r in rows if r["heldout_error_vs_one_shot"] is not None]
        errors = None if self.heldout_errors is None else [float(f"{e:.4g}") for e in self.heldout_errors]
        return {"segments": self.segments, "samples": self.samples, "sites": rows, "kept": self.kept, "rejected": self.rejected,
                "rechosen": self.rechosen, "retried": self.retried,
                "heldout_model_error": errors,
                "median_heldout_error_vs_one_shot": float(np.median(ratios)) if ratios else None}


def removed_elements(analysis: Analysis, plan: Plan) -> dict[str, np.ndarray]:
    """Per tensor, the element positions on its unit axis that the plan removes (every space)."""
    removed, _, blocks = removed_slots(pruned_spaces(analysis, plan))
    return {tensor: expand_blocks(slots, blocks[tensor]) for tensor, slots in removed.items()}


def narrow_cached(spaces: list[Space], caches: list[BoundaryCache], shown: dict[str, np.ndarray], run_removed: dict[str, np.ndarray]) -> None:
    """Cut the cached activations of the spaces just chosen (taken without the elements in
    `shown`) to what the rest of the pass runs, without `run_removed` (at a shared tensor the
    other spaces' channels stay as they were)."""
    for tensor in {t for s in spaces for t in s.tensors}:
        placement = next(s.tensors[tensor] for s in spaces if tensor in s.tensors)
        present = np.setdiff1d(np.arange(placement.size), shown.get(tensor, NONE))
        positions = np.flatnonzero(~np.isin(present, run_removed.get(tensor, NONE)))
        if len(positions) == len(present):
            continue
        for cache in caches:
            if tensor in cache.names():
                cache.select(tensor, placement.axis, positions)


class PassPlan:
    """The plan the pass folds into (`plan`, keep sets chosen so far) and the one the pruned model
    runs (`run`): spaces `pending` a choice run all of their units until it is made. `removed`
    and `run_removed` give per tensor the element positions each of them removes, `run_io` the
    graph inputs (KV caches) the run feeds narrower."""

    def __init__(self, analysis: Analysis, plan: Plan, pending: dict[int, Space]):
        self.analysis, self.plan, self.pending = analysis, plan, pending
        self.removed = removed_elements(analysis, plan)
        self._set_run()

    def _set_run(self) -> None:
        self.run = unpruned(self.plan, list(self.pending.values())) if self.pending else self.plan
        self.run_removed = self.removed if self.run is self.plan else removed_elements(self.analysis, self.run)
        # the run's KV-cache inputs: a grouped-query KV head goes only once its query heads are chosen
        self.run_io = cache_io_changes(self.analysis, self.run)

    def chosen(self, spaces_plan: dict[int, SpacePlan], spaces: list[Space]) -> None:
        """The `spaces` are chosen (their keep sets in `spaces_plan`): the rest of the pass runs them so."""
        for space in spaces:
            del self.pending[space.id]
        self.plan = dataclasses.replace(self.plan, spaces=spaces_plan)
        self.removed = removed_elements(self.analysis, self.plan)
        self._set_run()


class PassDecisions:
    """What the pass decided so far: each space's keep set (`plans`, chosen again where the pass
    can) and each site's refitted recovery (`result`), from the moments of the segment runs."""

    def __init__(self, fits: SiteFits, plans: PassPlan, one_shot: dict[tuple, Recovery], result: SequentialResult):
        self.fits, self.plans, self.result = fits, plans, result
        self.index = fits.index
        self.one_shot = dict(one_shot)  # the shrinkage priors; a keep set chosen again brings its own
        self.prefit: dict[tuple[int, str], tuple[Recovery, SequentialFit]] = {}  # fits the choice of keep set already made

    def provisional(self) -> dict[tuple, Recovery]:
        """Stand-ins for the sites a run ahead of the pass crosses before they are fitted: their
        one-shot recoveries (not of spaces still pending a choice, nor at shared sites)."""
        return {k: v for k, v in self.one_shot.items() if k[0] not in self.plans.pending and k[1] not in self.fits.shared}

    def forget_prefits(self, sites: list[str]) -> None:
        """Drop the fits a choice made at later `sites`: each is fitted on its own segment's run."""
        for key in [k for k in self.prefit if k[1] in sites]:
            del self.prefit[key]

    def rechoose(self, spaces: list[Space], moments: dict[str, tuple[CrossMoments, CrossMoments | None]], caches: list[BoundaryCache]) -> None:
        """Choose the spaces' units again on the pruned model's activations (same counts); a new
        keep set is taken if its fit's held-out error is lower (never with nothing held out),
        with a one-shot prior of its own. The spaces' cached activations are narrowed to the choice."""
        spaces_plan = dict(self.plans.plan.spaces)
        for space in spaces:
            site_moments = {t: moments[t][0] for t in space.sites}
            current = spaces_plan[space.id]
            shared = {t: self.fits.shared_columns(space, t, spaces_plan, self.plans.run_removed) for t in space.sites if t in self.fits.shared}
            candidate = rechosen(space, len(current.keep), site_moments, self.index, shared)
            if not np.array_equal(candidate.keep, current.keep):
                priors = one_shot_prior(space, candidate, site_moments)
                (new_error, new_fits), (old_error, old_fits) = (self.fits.keep_set(space, {**spaces_plan, space.id: p}, {**self.one_shot, **r}, moments, self.plans.run_removed)
                                                                for p, r in ((candidate, priors), (current, {})))
                if new_error is not None and new_error < old_error:  # unguarded choices lost on two benchmarks
                    spaces_plan[space.id] = current = candidate
                    self.one_shot.update(priors)
                    self.result.rechosen.append(space.name)
                self.prefit.update(new_fits if current is candidate else old_fits)
        shown = self.plans.run_removed
        self.plans.chosen(spaces_plan, spaces)
        self.result.plan = self.plans.plan
        narrow_cached(spaces, caches, shown, self.plans.run_removed)

    def fit_site(self, tensor: str, cal: CrossMoments, held: CrossMoments | None, changed: bool, shown: dict[str, np.ndarray]) -> None:
        """Fit the site's recoveries from moments of a run that did not show the elements in `shown`."""
        if tensor in self.fits.shared:  # a Concat or a channel shuffle: one map for all its spaces, under the first
            if len(self.plans.removed.get(tensor, ())) or changed:
                owner = self.fits.owners[tensor][0]
                recovery, fit = self.fits.shared_site(tensor, self.plans.plan.spaces, self.one_shot, cal, held, shown)
                self.result.recoveries[(owner.id, tensor)] = recovery
                self.result.fits[(owner.name, tensor)] = fit
            return
        for space in self.fits.owners.get(tensor, []):
            space_plan = self.plans.plan.spaces[space.id]
            if not len(space_plan.prune) and not changed:
                continue  # nothing upstream changed this site: no correction (ratio 0 stays bit-identical)
            recovery, fit = self.prefit.pop((space.id, tensor), None) or self.fits.space_site(
                space, tensor, space_plan, self.one_shot.get((space.id, tensor)), cal, held, shown)
            self.result.recoveries[(space.id, tensor)] = recovery
            self.result.fits[(space.name, tensor)] = fit
