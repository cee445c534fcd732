"""Sequential (error-correcting) recovery: the fit against a NumPy reference of the cross-moment
solve, exactness where one-shot is exact, bit-identity at ratio 0, exact merges, the segment
cuts, and that it corrects what the one-shot fit leaves on a trained model."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
import onnxprune.fidelity
from builders import cli, planted_cnn, planted_mlp, random_cnn, random_mlp, relative_l2, run, run_tensors
from onnxprune.analyse import Consumer
from onnxprune.api import calibration_statistics, fit_recoveries, prepare
from onnxprune.calibrate import make_session
from onnxprune.cost import build_cost_model
from onnxprune.crossgraph import ALL_ROWS, CrossSite, accumulate, cross_patch
from onnxprune.data import CalibrationData
from onnxprune.plan import Target, make_plan
from onnxprune.recovery import Recovery, fit_sequential
from onnxprune.refit import fit_sequentially
from onnxprune.rewrite import fold_consumer_weight, rewrite
from onnxprune.score import score_space
from onnxprune.segments import cut_segments, extract
from onnxprune.stats import CrossStats

FMNIST = "models/data/fmnist_calib.npz"


def _pipeline(model, calib, ratio: float, shrinkage: float | None = None):
    """prepare -> statistics -> scores -> plan -> one-shot and sequential recoveries."""
    prepared = prepare(model, calib)
    stats = calibration_statistics(prepared)
    analysis = prepared.analysis
    scores = {s.id: score_space(s, stats, prepared.index) for s in analysis.prunable}
    plan = make_plan(analysis, scores, build_cost_model(prepared.index, analysis), Target("ratio", ratio))
    one_shot = fit_recoveries(analysis, plan, stats)
    result = fit_sequentially(prepared, plan, stats, "lsq", one_shot, shrinkage=shrinkage, samples=0)  # every sample: the references use them all
    return prepared, plan, one_shot, result


def _lstsq_map(x_pruned: np.ndarray, x_original: np.ndarray) -> np.ndarray:
    """T ((k+1) x n) minimising ||x_o - [1 x~] T||: the reference cross-moment solve."""
    design = np.hstack([np.ones((len(x_pruned), 1)), x_pruned])
    return np.linalg.lstsq(design, x_original, rcond=None)[0]


def add_columns(stats: CrossStats, cols_p: np.ndarray, cols_o: np.ndarray) -> None:
    """The NumPy reference of one batch's cross moments (unit-major float32 matrices, shifted in
    place), added to `stats` as the pass's in-graph products are."""
    rows = cols_p.shape[1]
    total_p, total_o = cols_p.sum(axis=1, dtype=np.float64), cols_o.sum(axis=1, dtype=np.float64)
    cols_p -= stats.shift_p.astype(np.float32)[:, None]
    cols_o -= stats.shift_o.astype(np.float32)[:, None]
    stats.add_moments(rows, total_p, total_o, cols_p @ cols_p.T, cols_p @ cols_o.T, cols_o @ cols_o.T if stats.with_oo else None)


def test_sequential_fit_matches_numpy_reference_on_three_layers() -> None:
    model = random_mlp(widths=(12, 16, 14, 10, 5), seed=3)
    x = np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32)
    prepared, plan, _, result = _pipeline(model, {"x": x}, 0.3, shrinkage=0.0)
    weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    layers = [(weights[n.input[1]], weights[n.input[2]]) for n in gemms]
    spaces = {s.producers[0]: s for s in prepared.analysis.prunable}
    calib = x[: prepared.calib_data.n_samples].astype(np.float64)
    h_original, h_pruned = calib, calib
    for (w, b), node in zip(layers[:-1], gemms[:-1], strict=True):
        h_original = np.maximum(h_original @ w.T + b, 0)
        space = spaces[node.name]
        keep, prune = plan.spaces[space.id].keep, plan.spaces[space.id].prune
        h_pruned = np.maximum(h_pruned @ w.T + b, 0)[:, keep]  # the sliced producer
        reference = _lstsq_map(h_pruned, h_original[:, np.concatenate([keep, prune])])
        recovery = result.recoveries[(space.id, space.sites[0])]
        got = np.vstack([np.concatenate([recovery.kept_offset, recovery.offset]),
                         np.hstack([recovery.kept_weights.T, recovery.weights.T])])
        assert np.abs(got - reference).max() <= 1e-6 * max(1.0, np.abs(reference).max())
        # the next layer sees the recovered original units: the fold of this site
        h_pruned = (np.hstack([np.ones((len(h_pruned), 1)), h_pruned]) @ reference)[:, np.argsort(np.concatenate([keep, prune]))]
    pruned = rewrite(prepared.original, prepared.analysis, plan, result.recoveries, prepared.index.constants)
    fresh = np.random.default_rng(1).standard_normal((50, 12)).astype(np.float32)
    h = fresh.astype(np.float64)
    for w, b in layers[:-1]:
        h = np.maximum(h @ w.T + b, 0)
    last_space = spaces[gemms[-2].name]
    # the reference model: every layer reads the recovered units of the layer before
    h_ref = fresh.astype(np.float64)
    for (w, b), node in zip(layers[:-1], gemms[:-1], strict=True):
        space = spaces[node.name]
        keep, prune = plan.spaces[space.id].keep, plan.spaces[space.id].prune
        r = result.recoveries[(space.id, space.sites[0])]
        kept = np.maximum(h_ref @ w.T + b, 0)[:, keep]
        h_ref = np.zeros((len(kept), space.n))
        h_ref[:, keep] = kept @ r.kept_weights.T + r.kept_offset
        h_ref[:, prune] = kept @ r.weights.T + r.offset
    w, b = layers[-1]
    assert last_space is not None
    np.testing.assert_allclose(run(pruned, fresh), h_ref @ w.T + b, rtol=1e-4, atol=1e-4)


def test_first_site_equals_one_shot() -> None:
    """With nothing pruned upstream the sequential solution is the one-shot one, whatever the shrinkage."""
    model = random_mlp(widths=(12, 20, 6), seed=1)
    x = np.random.default_rng(2).standard_normal((400, 12)).astype(np.float32)
    prepared, plan, one_shot, result = _pipeline(model, {"x": x}, 0.4)
    (key, recovery), = result.recoveries.items()
    np.testing.assert_allclose(recovery.weights, one_shot[key].weights, atol=1e-5)
    np.testing.assert_allclose(recovery.offset, one_shot[key].offset, atol=1e-5)
    np.testing.assert_allclose(recovery.kept_weights, np.eye(len(recovery.keep)), atol=1e-6)


def test_the_pass_holds_out_at_most_a_quarter_of_its_refit_samples(monkeypatch) -> None:
    """The pass refits on `samples` calibration samples and scores its shrinkage on at most a
    quarter as many held-out ones, spread over the held-out set; with every calibration sample
    (samples=0) it takes every held-out one."""
    import onnxprune.refit as refit

    model = random_mlp(widths=(12, 20, 6), seed=1)
    x = np.random.default_rng(2).standard_normal((2000, 12)).astype(np.float32)
    prepared = prepare(model, {"x": x}, batch_size=16, verify_samples=200)
    stats = calibration_statistics(prepared)
    scores = {s.id: score_space(s, stats, prepared.index) for s in prepared.analysis.prunable}
    plan = make_plan(prepared.analysis, scores, build_cost_model(prepared.index, prepared.analysis), Target("ratio", 0.4))
    seen: dict[int, list] = {}

    def counting(*args):
        batches = args[7]
        seen[len(seen)] = [(len(b["x"]), held, b["x"][:, 0].copy()) for b, held in batches()]
        raise RuntimeError("counted")

    monkeypatch.setattr(refit, "sequential_recoveries", counting)
    held_rows = {}
    for samples in (160, 0):
        with pytest.raises(RuntimeError, match="counted"):
            fit_sequentially(prepared, plan, stats, "lsq", fit_recoveries(prepared.analysis, plan, stats), samples=samples)
        held = [(n, rows) for n, h, rows in seen[len(seen) - 1] if h]
        held_rows[samples] = held
    assert sum(n for n, _ in held_rows[160]) == 48  # 40 wanted: three whole batches of 16
    assert sum(n for n, _ in held_rows[0]) == 200
    every = np.concatenate([rows for _, rows in held_rows[0]])
    capped = np.concatenate([rows for _, rows in held_rows[160]])
    assert np.isin(capped, every).all() and capped[-1] == every[-1]  # held-out samples, spread to the set's end


@pytest.mark.parametrize("planted", [planted_cnn(bn=True, pool=True), planted_cnn(kernel=3), planted_mlp(), planted_mlp(style="matmul")],
                         ids=["cnn_bn_pool", "cnn_3x3", "mlp_gemm", "mlp_matmul"])
def test_planted_duplicates_removed_exactly_with_sequential(planted) -> None:
    calib = {"x": planted.inputs(64 if len(planted.input_shape) == 4 else 400, seed=1)}
    pruned, report = onnxprune.prune(planted.model, calib, tolerance=1e-5, order="pivoted", sequential=True)
    kept = {row.name: row.kept for row in report.spaces}
    for space, n in planted.units.items():
        assert kept[space] == n - planted.removable(space)
    fresh = planted.inputs(40, seed=2024)
    assert relative_l2(run(planted.model, fresh), run(pruned, fresh)) < 1e-4
    assert report.sequential["sites"]


def test_ratio_zero_is_bit_identical_with_sequential() -> None:
    model = random_cnn()
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.0, sequential=True)
    assert np.array_equal(run(model, x), run(pruned, x))
    assert report.sequential["sites"] == []


def test_cross_stats_of_shards_merge_exactly() -> None:
    rng = np.random.default_rng(5)
    original = rng.standard_normal((7, 300)).astype(np.float32) + 3
    pruned = original[[0, 2, 3, 6]] + 0.01 * rng.standard_normal((4, 300)).astype(np.float32)
    shift_o = original[:, :8].mean(axis=1)
    whole, first, second = (CrossStats(shift_o[[0, 2, 3, 6]], shift_o, with_oo=True) for _ in range(3))
    for batch in (slice(0, 100), slice(100, 300)):
        add_columns(whole, pruned[:, batch].copy(), original[:, batch].copy())
    add_columns(first, pruned[:, :100].copy(), original[:, :100].copy())
    add_columns(second, pruned[:, 100:].copy(), original[:, 100:].copy())
    first.add(second)
    for name in ("total_p", "total_o", "pp", "po", "oo"):
        assert np.array_equal(getattr(first, name), getattr(whole, name)), name
    moments = whole.moments()
    reference = np.cov(np.vstack([pruned, original]).astype(np.float64), bias=True)
    np.testing.assert_allclose(moments.cov_po, reference[:4, 4:], atol=1e-5)
    np.testing.assert_allclose(moments.mean_o, original.mean(axis=1, dtype=np.float64), rtol=1e-6)


def test_fold_with_kept_map_matches_direct_formula() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)  # Conv [out, in, kh, kw]
    keep, prune = np.array([0, 2, 3]), np.array([1, 4])
    recovery = Recovery(rng.standard_normal((2, 3)), rng.standard_normal(2), keep, prune,
                        kept_weights=rng.standard_normal((3, 3)), kept_offset=rng.standard_normal(3))
    consumer = Consumer("conv", "Conv", 1, 1, 0, "site")
    new, delta = fold_consumer_weight(weight, consumer, 5, recovery)
    w = weight.astype(np.float64)
    expected = np.einsum("okhw,kj->ojhw", w[:, keep], recovery.kept_weights) + np.einsum("ophw,pj->ojhw", w[:, prune], recovery.weights)
    np.testing.assert_allclose(new[:, keep], expected, rtol=1e-5, atol=1e-6)
    expected_delta = np.einsum("okhw,k->o", w[:, keep], recovery.kept_offset) + np.einsum("ophw,p->o", w[:, prune], recovery.offset)
    np.testing.assert_allclose(delta, expected_delta, rtol=1e-6)


def test_shrinkage_choice_minimises_heldout_error() -> None:
    """A noisy cross fit on few rows: the held-out choice is never worse than one-shot on held-out moments."""
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((6, 6))

    def moments(n: int) -> onnxprune.stats.CrossMoments:
        original = rng.standard_normal((n, 6)) @ mixing
        pruned = original[:, :4] + 0.3 * rng.standard_normal((n, 4))
        stats = CrossStats(np.zeros(4), np.zeros(6), with_oo=True)
        add_columns(stats, pruned.T.astype(np.float32).copy(), original.T.astype(np.float32).copy())
        return stats.moments()

    cal, held = moments(40), moments(2000)
    one_shot = Recovery(np.linalg.lstsq(cal.cov_pp[:4, :4] + 0 * np.eye(4), cal.cov_po[:, 4:], rcond=None)[0].T, np.zeros(2),
                        np.arange(4), np.arange(4, 6))
    _, fit = fit_sequential(cal, np.arange(4), np.arange(4, 6), one_shot, held, np.eye(6))
    assert fit.error <= fit.error_one_shot
    _, fixed = fit_sequential(cal, np.arange(4), np.arange(4, 6), one_shot, held, np.eye(6), shrinkage=0.0)
    assert fixed.shrinkage == 0.0 and fit.error <= fixed.error + 1e-12


def test_sequential_corrects_a_trained_cnn() -> None:
    """Fashion-MNIST VGG at half its MACs: the error on the held-out samples drops well below one-shot's."""
    one_shot = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=False).report
    sequential = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=True).report
    assert sequential.macs_after == one_shot.macs_after
    assert sequential.fidelity[0].relative_l2 < 0.7 * one_shot.fidelity[0].relative_l2
    assert sequential.sequential["median_heldout_error_vs_one_shot"] < 1.0


def test_segments_cut_between_sites_and_reproduce_activations() -> None:
    model = random_cnn(channels=(3, 8, 12, 6, 4))
    sites = ["relu1_out", "relu2_out", "relu3_out"]
    names = {n.output[0]: n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    sites = sorted(names)
    shapes = {s: (1, 8, 8, 8) for s in sites}
    segments = cut_segments(model, sites, shapes)
    assert [s.sites for s in segments] == [[t] for t in sites]
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = dict(zip(sites, run_tensors(model, x, sites), strict=True))
    available: dict[str, np.ndarray] = {}
    for segment in segments:
        outputs = list(dict.fromkeys([*segment.sites, *[t for t in segment.boundary if t not in available]]))
        part = extract(model, {k: v.dtype for k, v in available.items()}, outputs)
        from onnxprune.calibrate import make_session

        session = make_session(part)
        feeds = {i.name: (available[i.name] if i.name in available else x) for i in part.graph.input}
        values = dict(zip(outputs, session.run(None, feeds), strict=True))
        for site in segment.sites:
            np.testing.assert_array_equal(values[site], expected[site])
        available = {t: (values[t] if t in values else available[t]) for t in segment.boundary}


def reference_columns(array: np.ndarray, axis: int, stride: int) -> np.ndarray:
    """Units x rows of an activation sampled like the calibration, in NumPy."""
    if stride > 1:
        array = array[(slice(None), slice(None), *[slice(None, None, stride)] * (array.ndim - 2))]
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1).astype(np.float32)


@pytest.mark.parametrize(("shape", "axis", "stride", "kept", "noise"), [
    ((3, 4, 9, 9), 1, 2, [0, 2, 3], True),  # per-sample products on a sampled feature map
    ((3, 6, 5), 1, 1, [1, 2, 3, 4, 5], True),  # too few positions per unit: rows [R, C]
    ((2, 7, 5), 2, 1, [0, 1, 3, 4], True),  # units on the last axis (a transformer's hidden state)
    ((2, 7, 5), 2, 1, [0, 1, 2, 3, 4], False),
    ((3, 4, 9, 9), 1, 1, [0, 1, 2, 3], False),  # the same units, unchanged by upstream pruning
    ((3, 4, 9, 9), 1, 2, [0, 1, 2, 3], True),  # the same units, changed
])
def test_in_graph_cross_moments_equal_numpy(shape, axis, stride, kept, noise) -> None:
    """The pruned segment's session computes x~^T x~, x~^T x_o and x_o^T x_o about the shifts
    and the raw sums, as `add_columns` does from the activations in NumPy."""
    rng = np.random.default_rng(0)
    original = rng.normal(1.0, 2.0, shape).astype(np.float32)
    pruned = np.take(original, kept, axis=axis)
    pruned = pruned + np.float32(0.1 * noise) * rng.normal(size=pruned.shape).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["site"]), helper.make_node("Identity", ["y"], ["pruned_site"])], "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "y")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("site", "pruned_site")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    shift_o = rng.normal(1.0, 0.5, shape[axis]).astype(np.float32)
    shift_p = shift_o[kept]
    sampled_dims = [-(-d // stride) if a >= 2 else d for a, d in enumerate(shape) if a not in (0, axis)]
    site = CrossSite("site", "pruned_site", axis, len(shape), stride, len(kept), shape[axis], int(np.prod(sampled_dims)))
    patch, names = cross_patch(model, [site], {"site": (shift_p, shift_o)}, [])
    session = make_session(model, patch=patch)
    in_graph, reference = CrossStats(shift_p, shift_o, with_oo=True), CrossStats(shift_p, shift_o, with_oo=True)
    fetch = names["site"].fetched()
    values = dict(zip(fetch, session.run(fetch, {"x": original, "y": pruned, names["site"].oo_from: ALL_ROWS}), strict=True))
    differs = accumulate(in_graph, site, values, names["site"])
    add_columns(reference, reference_columns(pruned, axis, stride), reference_columns(original, axis, stride))
    assert differs == noise
    assert in_graph.count == reference.count
    for field in ("total_p", "total_o", "pp", "po", "oo"):
        np.testing.assert_allclose(getattr(in_graph, field), getattr(reference, field), rtol=1e-5, atol=1e-3)


def test_cli_sequential_flags(tmp_path, capsys) -> None:
    out = tmp_path / "m.onnx"
    code, stdout, _ = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "-o", str(out), "--ratio", "0.3", "--sequential", "--shrinkage", "0.1"], capsys)
    assert code == 0 and out.exists() and "sequential recovery" in stdout
    code, _, stderr = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "-o", str(out), "--shrinkage", "-1"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--shrinkage" in stderr
    code, _, stderr = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "--sequential", "--one-shot"], capsys)
    assert code == 2 and "not allowed with" in stderr
    code, stdout, _ = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "-o", str(out), "--ratio", "0.3",
                           "--sequential-samples", "128"], capsys)  # the default fit of a model without heads
    flat = " ".join(stdout.split())
    assert code == 0 and "recovery fit: sequential (auto: no attention" in flat and "on 128 calibration samples" in flat
    code, stdout, _ = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "-o", str(out), "--ratio", "0.3",
                           "--one-shot"], capsys)
    assert code == 0 and "sequential recovery" not in stdout and "recovery fit" not in stdout
    code, _, stderr = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "--sequential-samples", "-5"], capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--sequential-samples" in stderr


def test_method_without_recovery_warns_with_sequential() -> None:
    model = random_mlp(seed=2)
    x = np.random.default_rng(0).standard_normal((200, 20)).astype(np.float32)
    _, report = onnxprune.prune(model, {"x": x}, ratio=0.3, method="l2", sequential=True)
    assert not report.sequential and any("--sequential" in w for w in report.warnings)


def _same_weights(a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert [list(t.dims) for t in a.graph.initializer] == [list(t.dims) for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y), rtol=rtol, atol=atol)


def test_sequential_from_merged_shards_equals_a_single_pass() -> None:
    from onnxprune.shards import Statistics, partial_statistics

    options = dict(verify_samples=32, calib_samples=160)
    parts = [partial_statistics("models/vgg_bn.ts.onnx", FMNIST, (i, 2), options) for i in range(2)]
    merged = Statistics.merge_all(parts)
    from_shards, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, ratio=0.4, statistics=merged, sequential=True, **options)
    direct, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, ratio=0.4, sequential=True, **options)
    _same_weights(from_shards, direct, rtol=1e-4, atol=1e-5)


def test_sequential_with_weights_on_disk_equals_in_memory(tmp_path) -> None:
    """External data: the segments read the weights where they are; the result is the in-memory one."""
    source = tmp_path / "mlp.onnx"
    onnx.save_model(onnx.load("models/mlp.ts.onnx"), str(source), save_as_external_data=True, location="mlp.weights", size_threshold=0)
    on_disk, _ = onnxprune.prune(source, "models/data/fmnist_calib_flat.npz", ratio=0.4, sequential=True)
    in_memory, _ = onnxprune.prune("models/mlp.ts.onnx", "models/data/fmnist_calib_flat.npz", ratio=0.4, sequential=True)
    _same_weights(on_disk, in_memory, rtol=0, atol=0)


def test_a_large_refitted_model_waits_on_disk_during_the_guard(monkeypatch) -> None:
    """A refitted model past LARGE_MODEL goes to a temporary file while the guard runs it (its
    weights in memory only once, in onnxruntime); kept, it comes back whole and equal to the one
    refitted in memory."""
    import onnxprune.weights

    in_memory, report = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=True)
    assert report.sequential["kept"]
    offloads = []
    original_offload = onnxprune.weights.offload

    def counting(model):
        copy, weights = original_offload(model)
        offloads.append(weights is not None)
        return copy, weights

    monkeypatch.setattr(onnxprune.weights, "LARGE_MODEL", 1)
    monkeypatch.setattr(onnxprune.refit, "offload", counting)  # the refit waits on disk during the guard
    monkeypatch.setattr(onnxprune.api, "offload", counting)
    offloaded, report = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=True)
    assert report.sequential["kept"] and offloads[0]
    assert not any(t.external_data for t in offloaded.graph.initializer)
    _same_weights(offloaded, in_memory, rtol=0, atol=0)


def test_recoveries_spilled_to_disk_give_the_same_model(monkeypatch) -> None:
    """Every fitted recovery sent to a memory-mapped file once its segment is done (the threshold
    at 0): the same model bit for bit, and no folder left behind."""
    import onnxprune.boundary
    import onnxprune.tempfiles

    in_memory, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=True)
    spilled = []
    original_spill = onnxprune.boundary.RecoverySpill.spill

    def counting(self, recovery):
        out = original_spill(self, recovery)
        spilled.append(isinstance(out.weights, np.memmap))
        return out

    monkeypatch.setattr(onnxprune.boundary, "RECOVERY_SPILL_BYTES", 0)
    monkeypatch.setattr(onnxprune.boundary.RecoverySpill, "spill", counting)
    on_disk, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, flops=0.5, sequential=True)
    assert spilled and all(spilled)
    _same_weights(on_disk, in_memory, rtol=0, atol=0)
    assert not any(onnxprune.tempfiles.BOUNDARY_PREFIX in str(f) for f in onnxprune.tempfiles.live_folders())


def test_sequential_keeps_fp16_weights() -> None:
    from test_variety import to_fp16

    half = to_fp16(onnx.load("models/mlp.ts.onnx"))
    model, report = onnxprune.prune(half, "models/data/fmnist_calib_flat.npz", ratio=0.3, sequential=True)
    onnx.checker.check_model(model, full_check=True)
    assert {t.data_type for t in model.graph.initializer} - {onnx.TensorProto.INT64} == {onnx.TensorProto.FLOAT16}
    assert report.sequential["sites"] and report.fidelity[0].top1_agreement > 0.8


@pytest.mark.parametrize("target", [{"params": 0.3}, {"flops": 0.3}, {"tolerance": 0.05}])
def test_sequential_meets_every_target_kind(target) -> None:
    one_shot = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, **target).report
    sequential = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, sequential=True, **target).report
    assert (sequential.macs_after, sequential.params_after) == (one_shot.macs_after, one_shot.params_after)
    assert sequential.fidelity[0].relative_l2 <= one_shot.fidelity[0].relative_l2


def test_sequential_with_kv_cache_heads_pruned() -> None:
    """A KV-cache model whose cache inputs shrink: the pruned segments are fed the narrower caches."""
    from test_transformers import plant_redundant_group, spaces

    model = onnx.load("models/transformers/llama_tiny_kv.dynamo.onnx")
    calib = dict(np.load("models/transformers/calib_tokens_kv.npz"))
    plant_redundant_group(model, spaces(model, calib))  # layer 0's second KV group says nothing: it goes, with its cache
    pruned, report = onnxprune.prune(model, calib, ratio=0.8, sequential=True, head_gain=1)  # heads scored like neurons: some go
    assert report.io_changes and report.sequential["sites"]
    # the query heads' spaces are chosen again (their sites hold heads of 16 elements), the run
    # feeding caches as narrow as the KV heads derived from the plan at that point
    assert not any("failed" in w for w in report.warnings), report.warnings
    one_shot = onnxprune.prune(model, calib, ratio=0.8, head_gain=1).report
    assert report.fidelity[0].relative_l2 <= one_shot.fidelity[0].relative_l2 * 1.05


def test_cut_activations_spilled_to_disk_give_the_same_model(monkeypatch, tmp_path) -> None:
    """Cached activations beyond the in-memory budget go to owner-named memory-mapped files, removed at the end."""
    import onnxprune.boundary as boundary

    in_memory, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, ratio=0.4, sequential=True)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(boundary, "SPILL_BYTES", 1)
    spilled, _ = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, ratio=0.4, sequential=True)
    _same_weights(spilled, in_memory, rtol=0, atol=0)
    assert not list(tmp_path.glob("onnxprune-boundary-*"))


def test_sequential_with_a_shared_shape_concat_and_uneven_kv_groups() -> None:
    """A 3-layer GQA Llama (models/build_synthetic_llama.py --layers 3 --hidden 48 --heads 6
    --kv-heads 3 --ffn 32 --vocab 50 --n-calib 48 --window 16) whose repeat_kv Expands share one
    computed shape Concat from layer 0: when layer 0 keeps its 3 KV groups and later layers keep 2,
    a later segment must use its own copy of that shape, not the cached original (it failed with
    'invalid expand shape' before)."""
    from test_transformers import silence_heads

    model, calib = onnx.load("models/transformers/llama3_gqa.dynamo.onnx"), "models/transformers/llama3_gqa_calib.npz"
    queries = [s for s in onnxprune.inspect_model(model).spaces if not s.pinned and s.derived_from is None and s.units == 6]
    for layer in queries[1:]:  # the query heads of KV group 2 say nothing in layers 1 and 2: their KV heads go with them
        silence_heads(model, layer, [4, 5])
    options = dict(params=0.2, batch_size=4, verify_samples=4, allocation="global", head_gain=1)  # uneven KV groups here
    pruned, report = onnxprune.prune(model, calib, sequential=True, **options)
    kv = [row.kept for row in report.spaces if row.units == 3]
    assert kv[0] == 3 and min(kv[1:]) < 3, kv
    one_shot = onnxprune.prune(model, calib, **options).report
    assert report.fidelity[0].relative_l2 <= one_shot.fidelity[0].relative_l2 * 1.05


def test_latency_target_is_searched_one_shot_then_refitted() -> None:
    for attempt in range(3):  # the search times onnxruntime: on a loaded machine one search can see no gain at all
        try:
            pruned, report = onnxprune.prune("models/vgg_bn.ts.onnx", FMNIST, latency=0.1, round_to=8, sequential=True)
            break
        except onnxprune.errors.TargetError:
            if attempt == 2:
                raise
    assert report.latency["ratio"] < 1 and report.sequential["sites"]
    onnx.checker.check_model(pruned, full_check=True)


def test_a_refit_worse_than_one_shot_on_the_heldout_samples_is_not_kept(monkeypatch) -> None:
    """The model-level check: when the refitted model's held-out output error is higher, the
    one-shot model is written and the report says so."""
    import onnxprune.fidelity

    model = random_cnn(seed=3)
    calib = {"x": np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    x = calib["x"][:16]
    _, honest = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    errors = honest.sequential["heldout_model_error"]
    assert len(errors) == 2 and honest.sequential["kept"] == (errors[1] <= errors[0])
    one_shot, _ = onnxprune.prune(model, calib, ratio=0.4, allocation="global", sequential=False)
    calls = itertools.chain([0.0], itertools.repeat(1.0))  # one-shot scored first, then the refits: each looks worse
    monkeypatch.setattr(onnxprune.fidelity.ReferenceOutputs, "error", lambda self, m, changes: next(calls))
    pruned, report = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    assert report.sequential["kept"] is False and "NOT kept" in report.sequential_note()
    np.testing.assert_array_equal(run(pruned, x), run(one_shot, x))


def _residual_mlp(width: int = 10, hidden: int = 16, blocks: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x -> blocks of (MatMul -> Relu -> MatMul) + x: each hidden Relu is a site whose consumer
    lies before the cheapest cut (the residual sum), as in a transformer's FFN."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, stream = [], [], "x"
    for b in range(blocks):
        up, down = rng.standard_normal((width, hidden)) / np.sqrt(width), rng.standard_normal((hidden, width)) / np.sqrt(hidden)
        inits += [numpy_helper.from_array(up.astype(np.float32), f"up{b}"), numpy_helper.from_array(down.astype(np.float32), f"down{b}")]
        nodes += [helper.make_node("MatMul", [stream, f"up{b}"], [f"h{b}"], name=f"up{b}"),
                  helper.make_node("Relu", [f"h{b}"], [f"site{b}"], name=f"relu{b}"),
                  helper.make_node("MatMul", [f"site{b}", f"down{b}"], [f"d{b}"], name=f"down{b}"),
                  helper.make_node("Add", [stream, f"d{b}"], [f"s{b}"], name=f"add{b}")]
        stream = f"s{b}"
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info(stream, onnx.TensorProto.FLOAT, ["n", width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_refitted_segment_resumes_where_its_sites_are_produced(monkeypatch) -> None:
    """The pruned segment's second run starts from the activations live right after its sites
    (only the consumer and the residual add run again) and gives the model that rerunning the
    whole segment gives."""
    import onnxprune.sequential as sequential

    model = _residual_mlp()
    segments = cut_segments(model, ["site0", "site1", "site2"], {f"{p}{b}": (1, w) for p, w in (("h", 16), ("site", 16), ("d", 10), ("s", 10)) for b in range(3)})
    assert [s.at_sites for s in segments[:2]] == [["site0"], ["s0", "site1"]]
    assert [node.name for node in extract(model, {"s0": np.float32, "site1": np.float32}, segments[1].boundary).graph.node] == ["down1", "add1"]
    x = np.random.default_rng(1).standard_normal((400, 10)).astype(np.float32)
    resumed, _ = onnxprune.prune(model, {"x": x}, ratio=0.4, sequential=True, shrinkage=0.0)
    original_cut = sequential.cut_segments

    def without_resume_points(*args, **kwargs):
        return [sequential.GraphSegment(s.start, s.stop, s.sites, s.boundary, []) for s in original_cut(*args, **kwargs)]

    monkeypatch.setattr(sequential, "cut_segments", without_resume_points)
    rerun, _ = onnxprune.prune(model, {"x": x}, ratio=0.4, sequential=True, shrinkage=0.0)
    np.testing.assert_allclose(run(resumed, x[:50]), run(rerun, x[:50]), rtol=1e-5, atol=1e-6)
    assert relative_l2(run(model, x[:50]), run(resumed, x[:50])) > 0  # something was pruned


def test_spilled_batches_share_one_file_per_tensor(monkeypatch, tmp_path) -> None:
    """Every spilled batch of a tensor is appended to that tensor's one file and read back exactly
    (any shape and dtype); a tensor dropped at a cut takes its file with it."""
    import onnxprune.boundary as boundary

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(boundary, "SPILL_BYTES", 1)
    rng = np.random.default_rng(0)
    values = [{"a": rng.standard_normal((n, 3, 5)).astype(np.float32), "b": rng.integers(0, 9, (n, 7))} for n in (4, 4, 3)]
    cache = boundary.BoundaryCache()
    for i, batch in enumerate(values):
        for name, value in batch.items():
            cache.put(i, name, value)
    assert len(list(cache.folder.iterdir())) == 2
    for i, batch in enumerate(values):
        for name, value in batch.items():
            np.testing.assert_array_equal(cache.get(i, name), value)
    with pytest.raises(RuntimeError, match="after it was read"):
        cache.put(3, "a", values[0]["a"])
    cache.keep_only({"b"})
    assert len(list(cache.folder.iterdir())) == 1 and cache.names() == {"b"}
    cache.close()
    assert not list(tmp_path.glob("onnxprune-boundary-*"))


def test_the_pass_refits_on_a_spread_subset_of_the_calibration_samples() -> None:
    """`sequential_samples` caps the refit's calibration samples (whole batches spread over the
    set, reported); a cap that covers the set gives the model of no cap, bit for bit."""
    model = random_mlp(widths=(12, 16, 14, 10, 5), seed=3)
    x = np.random.default_rng(0).standard_normal((1200, 12)).astype(np.float32)
    capped, report = onnxprune.prune(model, {"x": x}, ratio=0.3, sequential=True, sequential_samples=256, batch_size=64, verify_samples=100)
    assert report.sequential["samples"] == 256
    assert "on 256 calibration samples" in report.sequential_note()
    every, report_all = onnxprune.prune(model, {"x": x}, ratio=0.3, sequential=True, sequential_samples=0, batch_size=64, verify_samples=100)
    covering, _ = onnxprune.prune(model, {"x": x}, ratio=0.3, sequential=True, sequential_samples=5000, batch_size=64, verify_samples=100)
    assert report_all.sequential["samples"] == 1100
    fresh = np.random.default_rng(1).standard_normal((64, 12)).astype(np.float32)
    np.testing.assert_array_equal(run(every, fresh), run(covering, fresh))
    assert relative_l2(run(every, fresh), run(capped, fresh)) < 0.5  # another, nearby fit
    with pytest.raises(onnxprune.TargetError, match="sequential-samples"):
        onnxprune.prune(model, {"x": x}, ratio=0.3, sequential=True, sequential_samples=-1)


def test_spread_batches_cover_the_set_evenly() -> None:
    data = CalibrationData({"x": np.arange(1000, dtype=np.float32)[:, None]})
    starts = [int(b["x"][0, 0]) for b in data.spread_batches(200, 50)]
    assert starts == [0, 317, 633, 950] and all(len(b["x"]) == 50 for b in data.spread_batches(200, 50))
    assert [len(b["x"]) for b in data.spread_batches(0, 300)] == [300, 300, 300, 100]  # 0: every batch
    assert sum(len(b["x"]) for b in data.spread_batches(990, 50)) == 1000  # 20 batches of 50 cover it


def test_auto_fits_sequentially_without_attention_and_one_shot_with_it() -> None:
    """The default fit: a conv net is refitted sequentially, a transformer one-shot (also when
    none of its heads can be pruned); the report says which and why; True / False force either."""
    cnn = random_cnn(seed=3)
    calib = {"x": np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    _, report = onnxprune.prune(cnn, calib, ratio=0.4)
    assert report.fit == {"mode": "sequential", "auto": True, "reason": "no attention"} and report.sequential
    assert report.fit_note().startswith("recovery fit: sequential (auto: no attention")
    _, forced = onnxprune.prune(cnn, calib, ratio=0.4, sequential=False)
    assert forced.fit == {"mode": "one-shot", "auto": False} and not forced.sequential and forced.fit_note() is None
    from test_transformers import CALIB, feeds_for, load  # a tiny BERT: attention heads

    model = load("bert_tiny.ts")
    _, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), ratio=0.3)
    assert report.fit["mode"] == "one-shot" and "prunable head spaces" in report.fit["reason"] and not report.sequential
    from onnxprune.allocate import attention_spaces

    prepared = prepare(model, feeds_for(model, CALIB, slice(None)))
    analysis = prepared.analysis
    heads = [p for s in analysis.spaces if s.id in attention_spaces(analysis, prepared.index) for p in s.producers]
    assert heads
    _, no_heads = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), ratio=0.3, exclude=heads)
    assert no_heads.fit["mode"] == "one-shot" and no_heads.fit["reason"].startswith("attention (0 prunable")  # still a transformer
    with pytest.raises(onnxprune.TargetError, match="sequential must be"):
        onnxprune.prune(cnn, calib, ratio=0.4, sequential="yes")


def test_a_failing_sequential_pass_writes_the_one_shot_model(monkeypatch) -> None:
    """Anything that stops the refit (an onnxruntime kernel refusing a segment, memory) leaves
    the one-shot fold, which is correct on its own: it is written with a warning."""
    import onnxprune.refit

    model = random_cnn(seed=3)
    calib = {"x": np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    one_shot, _ = onnxprune.prune(model, calib, ratio=0.4, sequential=False, allocation="global")

    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : ReorderInput (channels % 4) == 0 was false")

    monkeypatch.setattr(onnxprune.refit, "sequential_recoveries", broken)
    pruned, report = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    assert any(w.startswith("the sequential refit failed (RuntimeError: [ONNXRuntimeError]") for w in report.warnings)
    x = calib["x"][:16]
    np.testing.assert_array_equal(run(pruned, x), run(one_shot, x))


def test_a_refit_that_onnxruntime_optimisations_would_change_is_not_kept(monkeypatch) -> None:
    """A refit with a lower held-out error but outputs that onnxruntime's graph optimisations
    change (huge coefficients from few samples) would fail verification: one-shot is written."""
    import onnxprune.refit

    model = random_cnn(seed=3)
    calib = {"x": np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    one_shot, _ = onnxprune.prune(model, calib, ratio=0.4, sequential=False, allocation="global")
    monkeypatch.setattr(onnxprune.refit, "optimisation_problem", lambda *args: "output 'y' differs with onnxruntime optimisations on and off")
    calls = itertools.chain([1.0], itertools.repeat(0.0))  # one-shot scored first, then the refits: each looks better
    monkeypatch.setattr(onnxprune.fidelity.ReferenceOutputs, "error", lambda self, m, changes: next(calls))
    pruned, report = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    assert report.sequential["kept"] is False and "NOT kept, the one-shot model was written: output 'y'" in report.sequential_note()
    x = calib["x"][:16]
    np.testing.assert_array_equal(run(pruned, x), run(one_shot, x))


def test_optimisation_problem_passes_a_faithful_model() -> None:
    """The check the guard runs: None for a model whose outputs onnxruntime's optimisations do not
    change beyond the original's (the rejection itself is tested with a monkeypatched verdict above)."""
    from onnxprune.verify import optimisation_problem

    model = random_cnn(seed=3)
    batch = {"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    assert optimisation_problem(model, model, batch, {model.graph.output[0].name: run(model, batch["x"])}) is None


def test_large_activations_shrink_the_sequential_batch(monkeypatch) -> None:
    """Where one batch of the largest site's activations would pass the budget, the pass runs
    smaller batches (every sample still seen) and fits about the same model."""
    import onnxprune.refit
    from onnxprune.refit import sequential_batch_size

    model = random_cnn(seed=3)
    calib = {"x": np.random.default_rng(0).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    normal, report = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    prepared = prepare(model, calib)
    per_sample = max(int(np.prod(prepared.shapes[s.tensor][1:])) * 4 for s in prepared.analysis.sites())
    monkeypatch.setattr(onnxprune.refit, "SEQUENTIAL_BATCH_BYTES", 5 * per_sample)
    assert sequential_batch_size(prepared) == 5
    small, small_report = onnxprune.prune(model, calib, ratio=0.4, sequential=True, allocation="global")
    assert small_report.sequential["samples"] == report.sequential["samples"] == prepared.calib_data.n_samples
    x = calib["x"][:16]
    assert relative_l2(run(normal, x), run(small, x)) < 1e-3  # the same fit up to float32 sums per batch


def test_a_negative_held_out_error_estimate_is_never_chosen() -> None:
    """The held-out error is a difference of moments: where rounding makes the held-out
    covariance indefinite and the unshrunk map amplifies it, the estimate reads negative. Such a
    candidate counts as infinitely bad, so the shrinkage falls on a candidate measured properly;
    a sound estimate is returned as it is."""
    from onnxprune.recovery import HeldoutScorer
    from onnxprune.stats import CrossMoments

    rng = np.random.default_rng(0)
    rows, k = 4000, 6
    x = rng.standard_normal((rows, k))
    target = x[:, :3] @ rng.standard_normal((3, 2)) + 0.1 * rng.standard_normal((rows, 2))  # the original's 2 units
    both = np.hstack([x, target])
    cov = np.cov(both.T, bias=True)
    cal = CrossMoments(rows, x.mean(0), np.zeros(k + 2), cov[:k, :k], np.hstack([cov[:k, :k], cov[:k, k:]]))
    held_cov_pp = cov[:k, :k].copy()
    held_cov_pp[5, 5] = -1.0  # indefinite, as float32 rounding on few rows can leave it
    held = CrossMoments(rows, x.mean(0), np.zeros(k + 2), held_cov_pp, np.hstack([cov[:k, :k], cov[:k, k:]]),
                        np.block([[cov[:k, :k], cov[:k, k:]], [cov[k:, :k], cov[k:, k:]]]))
    metric = np.eye(k + 2)
    scorer = HeldoutScorer(held, metric)
    bad = np.zeros((k, k + 2))
    bad[5, 5] = 100.0  # a map that amplifies the indefinite direction
    assert scorer.error(bad @ metric, np.zeros(k + 2)) == np.inf
    identity = np.hstack([np.eye(k), np.zeros((k, 2))])
    sound = scorer.error(identity @ metric, np.zeros(k + 2))
    assert np.isfinite(sound) and sound > 0
    keep, prune = np.arange(k), np.arange(k, k + 2)
    _, fit = fit_sequential(cal, keep, prune, None, held, metric)
    assert np.isfinite(fit.error)
