"""Additive second-moment statistics of one activation site: count, sum and Gram in float64."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
