"""The maths of scoring, planning and recovery, and the in-graph calibration statistics."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, random_cnn, random_mlp, run_tensors
from onnxprune import TargetError
from onnxprune.analyse import analyse
from onnxprune.calibrate import collect_stats
from onnxprune.cost import CostModel
from onnxprune.graph import GraphIndex
from onnxprune.plan import Planner, Target, floor_units
from onnxprune.recovery import fit_recovery
from onnxprune.score import RIDGE, SpaceScore, cholesky_energy, pivoted_order
from onnxprune.stats import SiteStats, regularised


def _calib(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return {"x": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


@pytest.fixture(scope="module")
def mlp() -> tuple[onnx.ModelProto, dict]:
    model = random_mlp(widths=(20, 36, 28, 6), seed=1)
    return model, _calib(model, 300)


@pytest.fixture(scope="module")
def cnn() -> tuple[onnx.ModelProto, dict]:
    model = random_cnn(channels=(3, 16, 24, 12), seed=1)
    return model, _calib(model, 40)


def _prunable(report) -> list:
    return [row for row in report.spaces if not row.pinned]


# -- tail fractions ------------------------------------------------------------------------------
def test_tail_fraction_is_monotone_and_normalised() -> None:
    rng = np.random.default_rng(0)
    energy = rng.random(50) ** 3
    energy[[5, 17, 49]] = 0.0  # exactly redundant units
    tail = SpaceScore(0, rng.permutation(50), energy).tail_fraction()
    assert tail[0] == pytest.approx(1.0)
    assert np.all(np.diff(tail) <= 1e-15) and np.all(tail >= 0)
    assert tail[-1] == 0.0  # the last unit has energy 0: pruning it loses nothing
    np.testing.assert_allclose(tail, np.cumsum(energy[::-1])[::-1] / energy.sum())
    assert np.array_equal(SpaceScore(0, np.arange(4), np.zeros(4)).tail_fraction(), np.zeros(4))  # no NaN


def test_prune_scores_are_non_increasing() -> None:
    rng = np.random.default_rng(1)
    energy = np.sort(rng.random(30))[::-1]
    for standardised in (False, True):
        scores = SpaceScore(0, np.arange(30), energy, standardised=standardised).prune_scores()
        assert np.all(np.diff(scores) <= 1e-12), standardised


# -- ratio, round_to, min_keep -----------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
def test_ratio_meets_the_target(mlp, ratio: float) -> None:
    model, calib = mlp
    report = onnxprune.prune(model, calib, ratio=ratio).report
    total = report.units_before
    removed = total - report.units_after
    assert total == 36 + 28
    assert removed >= ratio * total
    assert removed <= math.ceil(ratio * total) + 1, f"ratio {ratio}: removed {removed} of {total}"
    assert sum(row.kept for row in _prunable(report)) == report.units_after


@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_round_to_keeps_multiples_of_8(mlp, cnn, ratio: float) -> None:
    for model, calib in (mlp, cnn):
        pruned, report = onnxprune.prune(model, calib, ratio=ratio, round_to=8)
        for row in _prunable(report):
            assert row.kept % 8 == 0 or row.kept == row.units, (row.name, row.units, row.kept)
        assert report.units_before - report.units_after >= ratio * report.units_before
        # the rewritten weights have those sizes
        weights = {t.name: t for t in pruned.graph.initializer}
        for row in _prunable(report):
            node = next(n for n in pruned.graph.node if n.name == row.producers[0])
            dims = weights[node.input[1]].dims
            assert row.kept == (dims[0] if node.op_type in ("Conv",) or _trans_b(node) else dims[1])


def test_channel_counts_off_multiples_of_8_are_warned_about(cnn) -> None:
    """round_to=1 can leave 16 -> 13 channels, which onnxruntime runs slowly: the report says so
    and names a layer; round_to=8 leaves no such warning."""
    model, calib = cnn
    report = onnxprune.prune(model, calib, ratio=0.2, round_to=1).report
    odd = [r for r in _prunable(report) if r.units % 8 == 0 and r.kept % 8]
    assert odd, "the fixture should leave a count that is not a multiple of 8"
    (warning,) = [w for w in report.warnings if "not multiples of 8" in w]
    assert warning.startswith(f"{len(odd)} layers keep " if len(odd) > 1 else "1 layer keeps ") and any(f"'{r.name}': {r.kept} of {r.units}" in warning for r in odd)
    rounded = onnxprune.prune(model, calib, ratio=0.2, round_to=8).report
    assert not [w for w in rounded.warnings if "not multiples of 8" in w]


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def test_floor_units() -> None:
    assert floor_units(10, 1) == 1
    assert floor_units(10, 4) == 4
    assert floor_units(10, 40) == 10  # never more than the space
    assert floor_units(10, 0.25) == 3  # a fraction rounds up
    assert floor_units(10, 0.01) == 1  # at least one unit
    assert floor_units(7, 0.5) == 4


@pytest.mark.parametrize("min_keep", [5, 0.5, 0.3])
def test_min_keep_floors_are_respected(mlp, min_keep: float) -> None:
    """tolerance=1 removes every unit the floors allow."""
    model, calib = mlp
    report = onnxprune.prune(model, calib, tolerance=1.0, min_keep=min_keep).report
    for row in _prunable(report):
        assert row.kept == floor_units(row.units, min_keep), (row.name, row.units, row.kept)
    with_round = onnxprune.prune(model, calib, tolerance=1.0, min_keep=min_keep, round_to=8).report
    for row in _prunable(with_round):
        want = floor_units(row.units, min_keep)
        assert row.kept == min(row.units, math.ceil(want / 8) * 8)


def test_min_keep_makes_a_ratio_unreachable(mlp) -> None:
    model, calib = mlp
    with pytest.raises(TargetError, match="cannot be reached"):
        onnxprune.prune(model, calib, ratio=0.8, min_keep=0.5)
    with pytest.raises(TargetError):
        onnxprune.prune(model, calib, ratio=0.5, min_keep=0)


# -- flops / params targets, measured on the rewritten model -----------------------------------
def _removed_fraction(report, kind: str) -> float:
    if kind == "flops":
        return 1 - report.macs_after / report.macs_before
    return 1 - report.params_after / report.params_before


@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("value", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("family", ["mlp", "cnn", "mlp_no_bias"])
def test_flops_and_params_targets_hold_on_the_rewritten_model(family: str, kind: str, value: float, mlp, cnn) -> None:
    """report.macs_after / params_after are counted on the pruned graph, so this checks that the
    planner's cost model predicts the rewrite. `mlp_no_bias` has Gemms without C: the recovery
    gives each consumer a bias, which are parameters the rewritten model has."""
    if family == "mlp_no_bias":
        model = random_mlp(widths=(20, 36, 28, 6), seed=1, bias=False)
        calib = _calib(model, 300)
    else:
        model, calib = mlp if family == "mlp" else cnn
    pruned, report = onnxprune.prune(model, calib, **{kind: value})
    got = _removed_fraction(report, kind)
    print(f"{family} {kind}={value}: removed {got:.4f}")
    assert got >= value, f"--{kind} {value}: the rewritten model has only {got:.2%} fewer {'MACs' if kind == 'flops' else 'params'}"
    assert got <= value + 0.08  # not grossly over
    assert report.target == {kind: value}


@pytest.mark.parametrize("kind", ["ratio", "flops", "params"])
def test_unreachable_targets_raise(mlp, kind: str) -> None:
    """The logits layer is pinned and every space keeps >= 1 unit: 99% cannot be removed."""
    model, calib = mlp
    with pytest.raises(TargetError, match="cannot be reached"):
        onnxprune.prune(model, calib, **{kind: 0.99})


@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=-0.1), dict(flops=1.5), dict(params=float("nan")), dict(tolerance=1.5),
                                    dict(ratio=0.2, flops=0.2), dict(ratio=0.2, round_to=0)])
def test_invalid_targets_raise(mlp, kwargs) -> None:
    model, calib = mlp
    with pytest.raises(TargetError):
        onnxprune.prune(model, calib, **kwargs)


def test_planner_on_synthetic_scores() -> None:
    """Two spaces with known energies; the planner's threshold meets the unit ratio exactly."""
    rng = np.random.default_rng(3)
    scores = {0: SpaceScore(0, rng.permutation(10), np.sort(rng.random(10))[::-1]),
              1: SpaceScore(1, rng.permutation(30), np.sort(rng.random(30))[::-1] * 5)}
    planner = Planner(scores, CostModel(), min_keep=1, round_to=1)
    for ratio in (0.1, 0.3, 0.55, 0.9):
        plan = planner.plan(Target("ratio", ratio))
        assert plan.units_removed == math.ceil(ratio * 40)
        for sid, space in plan.spaces.items():
            assert len(space.keep) + len(space.prune) == space.n
            assert set(space.keep) | set(space.prune) == set(range(space.n))
            # a suffix of the order is pruned
            assert set(space.prune) == set(scores[sid].order[len(space.keep):].tolist())
    assert planner.plan(Target("ratio", 0.0)).units_removed == 0
    assert planner.plan(Target("tolerance", 1.0)).units_removed == 38  # floors: one unit per space


# -- SNP orders and energies -----------------------------------------------------------------
def _duplicated_covariance(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((500, 6)) @ (np.eye(6) + 0.3 * rng.standard_normal((6, 6)))  # well conditioned
    x = np.column_stack([x, 0.5 * x[:, 2]])  # unit 6 = 0.5 x unit 2: the smaller copy
    return np.cov(x, rowvar=False, bias=True)


def test_pivoted_cholesky_puts_a_duplicate_last_with_zero_energy() -> None:
    cov = _duplicated_covariance()
    order, energy = pivoted_order(cov)
    assert sorted(order.tolist()) == list(range(7))
    assert order[-1] == 6, order
    assert np.all(np.isfinite(energy))
    assert energy[-1] < 1e-8 * energy.max()
    assert np.all(energy[:-1] > 1e-3 * energy.max())
    assert np.all(np.diff(energy) <= 1e-12 * energy.max())  # greedy: the largest residual comes next
    # D_i are the Cholesky pivots of the reordered (regularised) matrix: their product is its determinant
    np.testing.assert_allclose(energy, cholesky_energy(cov, order), rtol=1e-6, atol=1e-12 * energy.max())
    sign, logdet = np.linalg.slogdet(regularised(cov, RIDGE))
    assert sign > 0 and np.sum(np.log(energy)) == pytest.approx(logdet, rel=1e-6)


def test_pivoted_order_without_weights_bigger_copy_first() -> None:
    """If the copy is larger than the original, the original is the one left with no energy."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 5))
    x = np.column_stack([x, 3.0 * x[:, 1]])
    order, energy = pivoted_order(np.cov(x, rowvar=False, bias=True))
    assert order[-1] == 1
    assert energy[-1] < 1e-8 * energy.max()


def test_cholesky_energy_with_a_duplicate_in_the_middle() -> None:
    cov = _duplicated_covariance()
    order = np.array([2, 6, 0, 1, 3, 4, 5])  # the copy right after its original
    energy = cholesky_energy(cov, order)
    assert energy[0] == pytest.approx(cov[2, 2], rel=1e-6)
    assert energy[1] < 1e-8 * energy.max()
    assert np.all(energy[2:] > 1e-3 * energy.max())


def test_constant_and_zero_units_have_no_energy() -> None:
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.standard_normal((300, 4)), np.full(300, 0.7), np.zeros(300)])
    order, energy = pivoted_order(np.cov(x, rowvar=False, bias=True))
    assert set(order[-2:].tolist()) == {4, 5}
    assert np.all(energy[-2:] < 1e-8 * energy.max())
    order, energy = pivoted_order(np.zeros((3, 3)))  # a dead space: no NaN
    assert sorted(order.tolist()) == [0, 1, 2] and np.array_equal(energy, np.zeros(3))


# -- recovery ----------------------------------------------------------------------------------
def test_fit_recovery_recovers_an_exact_affine_relation() -> None:
    rng = np.random.default_rng(4)
    kept = rng.standard_normal((600, 4)) * [1.0, 3.0, 0.5, 2.0] + [0.3, -1.0, 2.0, 0.0]
    b_true = rng.standard_normal((3, 4))
    b0_true = np.array([1.5, -0.2, 0.0])
    pruned = kept @ b_true.T + b0_true
    keep, prune = np.array([0, 2, 4, 6]), np.array([1, 3, 5])  # interleaved positions
    rows = np.empty((600, 7))
    rows[:, keep], rows[:, prune] = kept, pruned
    recovery = fit_recovery(SiteStats.from_rows(rows), keep, prune)
    np.testing.assert_allclose(recovery.weights, b_true, atol=1e-6)
    np.testing.assert_allclose(recovery.offset, b0_true, atol=1e-6)
    # a constant unit is recovered by its value alone
    rows = np.column_stack([kept, np.full(600, 0.7)])
    recovery = fit_recovery(SiteStats.from_rows(rows), np.arange(4), np.array([4]))
    np.testing.assert_allclose(recovery.weights, 0, atol=1e-8)
    np.testing.assert_allclose(recovery.offset, [0.7], atol=1e-8)
    # nothing kept: the mean
    recovery = fit_recovery(SiteStats.from_rows(rows), np.array([], dtype=np.int64), np.arange(5))
    np.testing.assert_allclose(recovery.offset, rows.mean(axis=0))


def test_fit_recovery_on_kept_units_of_lower_rank_does_not_invert_round_off() -> None:
    """Kept units that span fewer dimensions than they count (a site whose rows repeat: learned
    queries, a fixed decoder prompt), with round-off making S_KK indefinite: the recovery is the
    minimum-norm one on the measured directions (the exact relation's weights), not weights that
    invert the round-off."""
    from scipy.linalg import cho_factor

    rng = np.random.default_rng(3)
    basis = rng.standard_normal((40, 5))  # 40 distinct rows, rank 5, repeated over the samples
    kept = basis @ rng.standard_normal((5, 8))
    pruned = kept @ rng.standard_normal((8, 3)) * 0.3
    stats = SiteStats.from_rows(np.tile(np.column_stack([kept, pruned]), (20, 1)))
    noise = rng.standard_normal((11, 11)) * 1e-7 * np.abs(stats.gram).max()
    stats.gram = stats.gram.astype(np.float32).astype(np.float64) + noise + noise.T  # a float32 Gram's rounding
    keep, prune = np.arange(8), np.arange(8, 11)
    with pytest.raises(np.linalg.LinAlgError):  # the Cholesky path cannot be taken
        cho_factor(stats.covariance()[np.ix_(keep, keep)])
    recovery = fit_recovery(stats, keep, prune)
    predicted = kept @ recovery.weights.T + recovery.offset
    assert np.linalg.norm(predicted - pruned) / np.linalg.norm(pruned) < 1e-4
    exact = np.linalg.lstsq(kept - kept.mean(0), pruned - pruned.mean(0), rcond=None)[0]  # minimum norm, no round-off
    assert np.abs(recovery.weights).max() < 1.5 * np.abs(exact).max()  # inverting the round-off gave 10.8 against 0.65


# -- statistics --------------------------------------------------------------------------------
def test_site_stats_are_additive() -> None:
    rows = np.random.default_rng(5).standard_normal((50, 6))
    merged = SiteStats.from_rows(rows[:17])
    merged.add(SiteStats.from_rows(rows[17:]))
    whole = SiteStats.from_rows(rows)
    assert merged.count == whole.count == 50
    np.testing.assert_allclose(merged.total, whole.total)
    np.testing.assert_allclose(merged.gram, whole.gram)
    np.testing.assert_allclose(whole.covariance(), np.cov(rows, rowvar=False, bias=True), atol=1e-12)
    c = whole.augmented()
    assert c[0, 0] == 50 and np.allclose(c[0, 1:], rows.sum(0)) and np.allclose(c[1:, 1:], rows.T @ rows)


def _assert_stats_match(model: onnx.ModelProto, x: np.ndarray, batch: int) -> int:
    analysis = analyse(model)
    sites = analysis.sites()
    assert sites
    index = GraphIndex(model)
    ranks = {s.tensor: index.rank(s.tensor) for s in sites}
    batches = [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]  # the last batch is shorter
    stats = collect_stats(model, sites, ranks, batches)
    for site, act in zip(sites, run_tensors(model, x, [s.tensor for s in sites]), strict=True):
        rows = np.moveaxis(act, site.axis, -1).reshape(-1, act.shape[site.axis])
        reference = SiteStats.from_rows(rows)
        got = stats[site.tensor]
        assert got.count == reference.count == rows.shape[0]
        for name in ("total", "gram"):
            a, b = getattr(got, name), getattr(reference, name)
            assert np.max(np.abs(a - b)) <= 1e-6 * np.max(np.abs(b)), (site.tensor, name)
    return len(sites)


def test_in_graph_statistics_of_a_conv_site() -> None:
    """NCHW site: every (image, y, x) position is a row of C units."""
    model = random_cnn(channels=(3, 8, 6), hw=5, seed=2)
    x = np.random.default_rng(6).standard_normal((23, 3, 5, 5)).astype(np.float32)
    assert _assert_stats_match(model, x, batch=7) == 2  # conv1 -> conv2 (NCHW), conv2 -> GAP/Flatten -> Gemm


def test_in_graph_statistics_of_a_matmul_site() -> None:
    """[N, T, D] tokens into a MatMul: every token is a row."""
    rng = np.random.default_rng(7)
    g = GraphBuilder([None, 4, 10])
    y = g.matmul("x", rng.standard_normal((10, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32), name="fc1")
    y = g.op("Relu", [y])
    y = g.matmul(y, rng.standard_normal((12, 3)).astype(np.float32), None, name="fc2")
    model = g.build(y, ["N", 4, 3])
    x = rng.standard_normal((19, 4, 10)).astype(np.float32)
    assert _assert_stats_match(model, x, batch=5) == 1


@pytest.mark.parametrize("flops", [0.3, 0.5, 0.7])
def test_round_to_gives_back_what_rounding_overshot(flops: float) -> None:
    """With --round-to 8 on a CNN of few, narrow layers one threshold overshoots (--flops 0.3
    removed 37% of the MACs before): whole steps go back while the target holds, so no single
    step more can be kept and the target is still met."""
    from pathlib import Path

    from onnxprune.api import calibration_statistics, prepare
    from onnxprune.cost import build_cost_model
    from onnxprune.plan import make_planner
    from onnxprune.score import score_space

    models = Path(__file__).resolve().parents[1] / "models"
    prepared = prepare(models / "vgg_bn.ts.onnx", models / "data" / "fmnist_calib.npz")
    stats = calibration_statistics(prepared)
    scores = {s.id: score_space(s, stats, prepared.index, "snp", "weighted", 0) for s in prepared.analysis.prunable}
    planner = make_planner(prepared.analysis, scores, build_cost_model(prepared.index, prepared.analysis), round_to=8)
    target = Target("flops", flops)
    plan = planner.plan(target)
    counts = {sid: len(p.keep) for sid, p in plan.spaces.items()}
    assert all(c % 8 == 0 or c == plan.spaces[sid].n for sid, c in counts.items())
    assert planner.removed_with("flops", counts) >= flops
    at_threshold = planner.removed("flops", plan.threshold)
    assert planner.removed_with("flops", counts) <= at_threshold
    for sid, count in counts.items():
        if count < plan.spaces[sid].n:
            assert planner.removed_with("flops", {**counts, sid: min(plan.spaces[sid].n, count + 8)}) < flops, f"space {sid} could keep 8 more units"
