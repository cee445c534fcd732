"""Additive second-moment statistics of one activation site: count, sum and Gram in float64."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from threadpoolctl import ThreadpoolController


def regularised(cov: np.ndarray, ridge: float) -> np.ndarray:
    """`cov` + ridge x its mean variance on the diagonal: exactly redundant units stay finite."""
    n = len(cov)
    return cov + ridge * max(np.trace(cov) / max(n, 1), np.finfo(float).tiny) * np.eye(n)


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive-definite matrix, through its Cholesky factor."""
    return sla.cho_solve(sla.cho_factor(matrix, check_finite=False), np.eye(len(matrix)), check_finite=False)


@dataclass
class SiteStats:
    """[1 X]^T [1 X] kept in parts: rows seen, column sums and X^T X (DESIGN §2)."""

    count: int
    total: np.ndarray
    gram: np.ndarray

    @classmethod
    def empty(cls, n: int) -> SiteStats:
        return cls(0, np.zeros(n), np.zeros((n, n)))

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> SiteStats:
        """Reference statistics of a (samples x units) matrix, in float64."""
        rows = np.asarray(rows, dtype=np.float64)
        return cls(len(rows), rows.sum(axis=0), rows.T @ rows)

    @property
    def n(self) -> int:
        return len(self.total)

    def add(self, other: SiteStats) -> None:
        """Merge another batch or shard in place (statistics are additive)."""
        self.count += other.count
        self.total += other.total
        self.gram += other.gram

    def subset(self, positions: np.ndarray) -> SiteStats:
        """Statistics of the selected columns only."""
        return SiteStats(self.count, self.total[positions], self.gram[np.ix_(positions, positions)])

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def without_gram(self) -> SiteStats:
        """The count and column sums only (the mean): what the sequential pass reads, without the
        n x n Gram (SmolLM2: 650 MB over its 60 sites)."""
        return SiteStats(self.count, self.total, np.zeros((0, 0)))

    def covariance(self) -> np.ndarray:
        """Centred second moment (population covariance): the Schur complement of the constant."""
        mean = self.mean()
        cov = self.gram / max(self.count, 1) - np.outer(mean, mean)
        return (cov + cov.T) / 2

    def augmented(self) -> np.ndarray:
        """C = [1 X]^T [1 X] with the constant unit first."""
        c = np.empty((self.n + 1, self.n + 1))
        c[0, 0] = self.count
        c[0, 1:] = c[1:, 0] = self.total
        c[1:, 1:] = self.gram
        return c


SMALL_PRODUCT = 1 << 27  # multiply-adds below which one BLAS thread is faster than several


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The loaded BLAS libraries, found once: a fresh `threadpool_limits` scans them on every call
    (about 3 ms, a sixth of a small model's sequential pass)."""
    return ThreadpoolController()


def single_blas_thread(small: bool) -> contextlib.AbstractContextManager:
    return blas_controller().limit(limits=1, user_api="blas") if small else contextlib.nullcontext()


@dataclass
class CrossStats:
    """Additive moments between the pruned model's activations x~ (k columns) and the
    original's x_o (n columns) at one site: sums, x~^T x~, x~^T x_o and (optionally) x_o^T x_o.

    Products are accumulated about fixed shifts (float32 per batch, float64 sums) and made
    exact by `moments`, as `calibrate.uncentred` does; shards with the same shifts merge exactly."""

    shift_p: np.ndarray
    shift_o: np.ndarray
    count: int = 0
    total_p: np.ndarray | None = None
    total_o: np.ndarray | None = None
    pp: np.ndarray | None = None
    po: np.ndarray | None = None
    oo: np.ndarray | None = None
    with_oo: bool = False

    def add_moments(self, rows: int, total_p: np.ndarray, total_o: np.ndarray, pp: np.ndarray, po: np.ndarray,
                    oo: np.ndarray | None = None) -> None:
        """Accumulate one batch given its raw column sums and its products about the shifts
        (`oo` is needed only `with_oo`)."""
        parts = {"total_p": total_p, "total_o": total_o, "pp": pp, "po": po}
        if self.with_oo:
            parts["oo"] = oo
        for name, value in parts.items():
            current = getattr(self, name)
            setattr(self, name, value.astype(np.float64) if current is None else current + value)
        self.count += rows

    def add(self, other: CrossStats) -> None:
        """Merge another shard's moments (same shifts) in place."""
        if other.count == 0:
            return
        if self.count == 0:
            for name in ("total_p", "total_o", "pp", "po", "oo"):
                setattr(self, name, None if getattr(other, name) is None else getattr(other, name).copy())
            self.count = other.count
            return
        for name in ("total_p", "total_o", "pp", "po", "oo"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name) + getattr(other, name))
        self.count += other.count

    def moments(self) -> CrossMoments:
        """Means and centred (co)variances, exact in float64."""
        n = max(self.count, 1)
        mean_p, mean_o = self.total_p / n, self.total_o / n
        dp, do = mean_p - self.shift_p, mean_o - self.shift_o  # centre moved from the shift to the mean

        def centred(product: np.ndarray, da: np.ndarray, db: np.ndarray) -> np.ndarray:
            return product / n - np.outer(da, db)

        oo = None if self.oo is None else centred(self.oo, do, do)
        return CrossMoments(self.count, mean_p, mean_o, centred(self.pp, dp, dp), centred(self.po, dp, do), oo)


@dataclass
class CrossMoments:
    """Means and centred second moments of (x~, x_o) at one site (population normalisation)."""

    count: int
    mean_p: np.ndarray
    mean_o: np.ndarray
    cov_pp: np.ndarray
    cov_po: np.ndarray
    cov_oo: np.ndarray | None = None

    def restrict(self, pruned_columns: np.ndarray, original_columns: np.ndarray) -> CrossMoments:
        """The moments of one space's columns at a shared site."""
        oo = None if self.cov_oo is None else self.cov_oo[np.ix_(original_columns, original_columns)]
        return CrossMoments(self.count, self.mean_p[pruned_columns], self.mean_o[original_columns],
                            self.cov_pp[np.ix_(pruned_columns, pruned_columns)], self.cov_po[np.ix_(pruned_columns, original_columns)], oo)
