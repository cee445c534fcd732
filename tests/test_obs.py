"""`--order obs`: greedy backward elimination by the exact output error of the LS recovery."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import obs
from onnxprune.obs import obs_order


def lsq_output_error(cov: np.ndarray, gram: np.ndarray, pruned: np.ndarray) -> float:
    """tr(G_PP S_P|K): the consumers' output error when `pruned` are recovered from the rest."""
    keep = np.setdiff1d(np.arange(len(cov)), pruned)
    schur = cov[np.ix_(pruned, pruned)]
    if keep.size:
        schur = schur - cov[np.ix_(pruned, keep)] @ np.linalg.solve(cov[np.ix_(keep, keep)], cov[np.ix_(keep, pruned)])
    return float(np.trace(gram[np.ix_(pruned, pruned)] @ schur))


def problem(seed: int, n: int, outputs: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, n)) @ rng.standard_normal((n, n))
    weight = rng.standard_normal((outputs, n))
    return np.cov(x.T, bias=True), weight.T @ weight


@pytest.mark.parametrize("step", [1, 3])
def test_tail_energies_are_the_exact_output_errors_of_the_recovery(monkeypatch, step) -> None:
    """Every suffix's energy sum is the output error of pruning that suffix with the LS
    recovery, summed over two sites (steps of several units too: a step's error is exact)."""
    monkeypatch.setattr(obs, "STEPS", -(-12 // step))
    pairs = [problem(0, 12, 5), problem(1, 12, 20)]
    order, energy = obs_order(pairs, 12, 1)
    assert sorted(order) == list(range(12))
    for j in range(0, 12, step):
        expected = sum(lsq_output_error(c, g, order[j:]) for c, g in pairs)
        np.testing.assert_allclose(energy[j:].sum(), expected, rtol=1e-6, atol=1e-7 * energy.sum())  # the ridge


def test_blocks_of_elements_are_removed_whole() -> None:
    cov, gram = problem(2, 12, 7)  # 4 units of 3 elements
    order, energy = obs_order([(cov, gram)], 4, 3)
    for j in range(4):
        elements = (order[j:, None] * 3 + np.arange(3)).ravel()
        np.testing.assert_allclose(energy[j:].sum(), lsq_output_error(cov, gram, elements), rtol=1e-6, atol=1e-7 * energy.sum())


def test_an_exact_copy_goes_first_and_costs_nothing() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 6))
    x = np.hstack([x, 2 * x[:, 2:3]])  # unit 6 = 2 x unit 2
    weight = rng.standard_normal((4, 7))
    order, energy = obs_order([(np.cov(x.T, bias=True), weight.T @ weight)], 7, 1)
    assert order[-1] in (2, 6) and energy[-1] < 1e-6 * energy.sum()
