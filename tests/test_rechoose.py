"""`--rechoose`: the sequential pass ranks each space's units again on the model as pruned upstream."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
import onnxprune.boundary as boundary
import onnxprune.decisions as decisions
from builders import cli, planted_cnn, planted_mlp, random_cnn, random_mlp, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.api import calibration_statistics, fit_recoveries, prepare
from onnxprune.cost import build_cost_model
from onnxprune.graph import GraphIndex
from onnxprune.plan import Target, make_plan
from onnxprune.rechoose import SharedColumns, backward_selection, forward_selection, greedy_cross_selection, greedy_selection
from onnxprune.recovery import shared_sites
from onnxprune.refit import fit_sequentially
from onnxprune.rewrite import rewrite
from onnxprune.score import consumer_metric, score_space, unit_block
from onnxprune.stats import CrossMoments


def _explained(cov: np.ndarray, cross: np.ndarray, columns: list[int]) -> float:
    """tr(T_K^T S_KK^-1 T_K) by a direct solve: the reference objective."""
    if not columns:
        return 0.0
    s = cov[np.ix_(columns, columns)]
    t = cross[columns]
    return float(np.trace(t.T @ np.linalg.solve(s, t)))


def test_forward_selection_matches_a_direct_greedy_reference() -> None:
    rng = np.random.default_rng(0)
    rows, n = 800, 9
    original = rng.standard_normal((rows, n)) @ rng.standard_normal((n, n))
    pruned = original + 0.3 * rng.standard_normal((rows, n))
    pruned[:, 4] = 1.0  # a unit the pruned model lost: it explains nothing
    metric = rng.standard_normal((n, 5))
    cov = np.cov(pruned.T, bias=True) + 1e-9 * np.eye(n)
    cross = (pruned - pruned.mean(0)).T @ (original - original.mean(0)) / rows @ metric
    got = forward_selection([cov], [cross], kept=6)
    chosen: list[int] = []
    for _ in range(6):
        gains = {j: _explained(cov, cross, chosen + [j]) for j in range(n) if j not in chosen}
        chosen.append(max(gains, key=gains.get))
    assert got.tolist() == chosen
    assert 4 not in got


def _block_moments(seed: int, rows: int, units: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(S~, S~o) of a noisy copy of correlated activations, units of `block` elements each."""
    rng = np.random.default_rng(seed)
    original = rng.standard_normal((rows, units * block)) @ rng.standard_normal((units * block, units * block))
    pruned = original + 0.5 * rng.standard_normal(original.shape)
    return np.cov(pruned.T, bias=True), (pruned - pruned.mean(0)).T @ (original - original.mean(0)) / rows


def _elements(units: list[int], block: int) -> list[int]:
    return [e for u in units for e in range(u * block, (u + 1) * block)]


def test_forward_selection_of_blocks_matches_a_direct_greedy_reference() -> None:
    """Units of two elements each (attention heads): the gain is the block's explained energy."""
    units, block = 5, 2
    cov, cross = _block_moments(2, 600, units, block)
    got = forward_selection([cov], [cross], kept=3, blocks=[block])
    chosen: list[int] = []
    for _ in range(3):
        gains = {j: _explained(cov, cross, _elements(chosen + [j], block)) for j in range(units) if j not in chosen}
        chosen.append(max(gains, key=gains.get))
    assert got.tolist() == chosen


def test_forward_selection_takes_locked_units_first_and_skips_copies() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 5))
    x = np.hstack([x, 2 * x[:, :1]])  # unit 5 copies unit 0
    cov = np.cov(x.T, bias=True)
    order = forward_selection([cov], [cov], kept=6, first=[3])
    assert order[0] == 3
    assert set(order[:5].tolist()) in ({0, 1, 2, 3, 4}, {1, 2, 3, 4, 5})  # never both copies before the rest


def _pipeline(model, calib, ratio: float):
    prepared = prepare(model, calib)
    stats = calibration_statistics(prepared)
    analysis = prepared.analysis
    scores = {s.id: score_space(s, stats, prepared.index) for s in analysis.prunable}
    plan = make_plan(analysis, scores, build_cost_model(prepared.index, analysis), Target("ratio", ratio))
    prior = fit_recoveries(analysis, plan, stats, within_space=True)
    return prepared, plan, stats, prior


def test_rechosen_units_and_fit_match_a_numpy_reference_on_three_layers() -> None:
    """Each layer keeps the units the greedy reference picks from the pruned-upstream activations
    (weighed by the next layer's weights) where the held-out guard takes them, and its fit is the
    cross-moment least squares on the units kept."""
    model = random_mlp(widths=(12, 16, 14, 10, 5), seed=3)
    x = np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32)
    prepared, plan, stats, prior = _pipeline(model, {"x": x}, 0.4)
    result = fit_sequentially(prepared, plan, stats, "lsq", prior, shrinkage=0.0, samples=0, rechoose=True)
    final = result.plan
    assert result.rechosen  # the check below would pass trivially otherwise
    weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    spaces = {s.producers[0]: s for s in prepared.analysis.prunable}
    calib = x[: prepared.calib_data.n_samples].astype(np.float64)
    h_original, h_pruned = calib, calib
    for i, node in enumerate(gemms[:-1]):
        w, b = weights[node.input[1]], weights[node.input[2]]
        h_original = np.maximum(h_original @ w.T + b, 0)
        full = np.maximum(h_pruned @ w.T + b, 0)  # every unit of this layer, on the pruned model's input
        space = spaces[node.name]
        kept = len(plan.spaces[space.id].keep)
        assert len(final.spaces[space.id].keep) == kept  # counts never change
        centred_p, centred_o = full - full.mean(0), h_original - h_original.mean(0)
        next_w = weights[gemms[i + 1].input[1]]
        cov = centred_p.T @ centred_p / len(full)
        cross = centred_p.T @ centred_o / len(full) @ next_w.T
        reference = greedy_selection([cov], [cross], kept)
        keep, prune = final.spaces[space.id].keep, final.spaces[space.id].prune
        # taken where its held-out fit error is lower, else the plan's units stay
        expected = sorted(reference.tolist()) if space.name in result.rechosen else plan.spaces[space.id].keep.tolist()
        assert keep.tolist() == expected
        h_pruned = full[:, keep]
        design = np.hstack([np.ones((len(h_pruned), 1)), h_pruned])
        solution = np.linalg.lstsq(design, h_original[:, np.concatenate([keep, prune])], rcond=None)[0]
        recovery = result.recoveries[(space.id, space.sites[0])]
        got = np.vstack([np.concatenate([recovery.kept_offset, recovery.offset]),
                         np.hstack([recovery.kept_weights.T, recovery.weights.T])])
        assert np.abs(got - solution).max() <= 1e-6 * max(1.0, np.abs(solution).max())
        h_pruned = (design @ solution)[:, np.argsort(np.concatenate([keep, prune]))]
    pruned = rewrite(prepared.original, prepared.analysis, final, result.recoveries, prepared.index.constants)
    fresh = np.random.default_rng(1).standard_normal((50, 12)).astype(np.float32)
    assert run(pruned, fresh).shape == (50, 5)


@pytest.mark.parametrize("planted", [planted_cnn(bn=True, pool=True), planted_cnn(kernel=3), planted_mlp()],
                         ids=["cnn_bn_pool", "cnn_3x3", "mlp_gemm"])
def test_planted_duplicates_removed_exactly_with_rechoose(planted) -> None:
    calib = {"x": planted.inputs(64 if len(planted.input_shape) == 4 else 400, seed=1)}
    pruned, report = onnxprune.prune(planted.model, calib, tolerance=1e-5, order="pivoted", sequential=True, rechoose=True)
    kept = {row.name: row.kept for row in report.spaces}
    for space, n in planted.units.items():
        assert kept[space] == n - planted.removable(space)
    fresh = planted.inputs(40, seed=2024)
    assert relative_l2(run(planted.model, fresh), run(pruned, fresh)) < 1e-4


def test_ratio_zero_is_bit_identical_with_rechoose() -> None:
    model = random_cnn()
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.0, sequential=True, rechoose=True)
    assert np.array_equal(run(model, x), run(pruned, x))
    assert report.sequential["rechosen"] == []


def test_rechoose_keeps_counts_and_lowers_the_fit_error_on_a_cnn() -> None:
    """Fashion-MNIST VGG at half its MACs: the same MACs, other units, a lower held-out error."""
    calib = "models/data/fmnist_calib.npz"
    plain = onnxprune.prune("models/vgg_bn.ts.onnx", calib, flops=0.5, sequential=True, allocation="global", rechoose=False).report
    again = onnxprune.prune("models/vgg_bn.ts.onnx", calib, flops=0.5, sequential=True, allocation="global").report  # the default
    assert again.macs_after == plain.macs_after
    assert again.sequential["rechosen"]
    assert f"units chosen again in {len(again.sequential['rechosen'])} layers" in again.sequential_note()
    assert again.sequential["heldout_model_error"][1] < 0.9 * plain.sequential["heldout_model_error"][1]


def test_cached_activations_narrowed_in_memory_and_on_disk(monkeypatch) -> None:
    cache = boundary.BoundaryCache()
    values = [np.arange(24, dtype=np.float32).reshape(2, 6, 2) + i for i in range(3)]
    cache.put(0, "a", values[0])
    monkeypatch.setattr(boundary, "SPILL_BYTES", 0)  # the next batches go to a file
    cache.put(1, "a", values[1])
    cache.put(2, "a", values[2])
    try:
        cache.select("a", 1, np.array([0, 3, 5]))
        for i, value in enumerate(values):
            np.testing.assert_array_equal(cache.get(i, "a"), value[:, [0, 3, 5]])
        assert cache.bytes == values[0][:, [0, 3, 5]].nbytes
        cache.select("a", 1, np.array([0, 2]))  # narrowed again: the spilled batches compose both
        for i, value in enumerate(values):
            np.testing.assert_array_equal(cache.get(i, "a"), value[:, [0, 5]])
    finally:
        cache.close()


def test_cli_rechooses_by_default_and_no_rechoose_turns_it_off(tmp_path, capsys) -> None:
    out, report_path = tmp_path / "p.onnx", tmp_path / "r.json"
    common = ["models/vgg_bn.ts.onnx", "--calib", "models/data/fmnist_calib.npz", "-o", out, "--flops", "0.5", "--allocation", "global",
              "--round-to", "1", "--report", report_path, "--overwrite"]
    code, _, err = cli(common, capsys)
    assert code == 0, err
    assert json.loads(report_path.read_text())["sequential"]["rechosen"]
    code, _, err = cli([*common, "--no-rechoose"], capsys)
    assert code == 0, err
    assert json.loads(report_path.read_text())["sequential"]["rechosen"] == []
    x = np.load("models/data/fmnist_calib.npz")["input"][:5]
    assert run(onnx.load(out), x).shape == (5, 10)


def test_only_spaces_the_pass_can_measure_whole_are_chosen_again(monkeypatch) -> None:
    """Heads take part (blocks of d_head elements) unless their site is too wide; a shared site
    or a model output keeps the plan's units."""
    import onnxprune.rechoose as rechoose
    from onnxprune.segments import cut_segments

    model = onnx.load("models/transformers/llama_tiny.dynamo.onnx")
    calib = dict(np.load("models/transformers/calib_tokens.npz"))
    prepared = prepare(model, {k: v for k, v in calib.items() if k in {i.name for i in model.graph.input}})
    spaces = prepared.analysis.prunable
    segments = cut_segments(prepared.original, sorted({t for s in spaces for t in s.sites}), prepared.shapes)
    heads = [s for s in spaces if unit_block(s) > 1]
    assert heads and {s.id for s in heads} <= {s.id for s in rechoose.rechoosable(spaces, segments, set(), prepared.index)}
    fixed = set(heads[0].sites)
    assert heads[0].id not in {s.id for s in rechoose.rechoosable(spaces, segments, fixed, prepared.index)}
    monkeypatch.setattr(rechoose, "BLOCK_ELEMENTS", 1)
    assert not {s.id for s in heads} & {s.id for s in rechoose.rechoosable(spaces, segments, set(), prepared.index)}
    monkeypatch.setattr(rechoose, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(rechoose, "MAX_UNITS", 1)  # every space has more units
    assert rechoose.rechoosable(spaces, segments, set(), prepared.index) == []


def test_sequential_rechoose_on_a_transformer_with_heads() -> None:
    """The same counts as the plan (heads and FFN neurons), a model that runs and stays close."""
    import onnxruntime as ort

    model = onnx.load("models/transformers/llama_tiny.dynamo.onnx")
    calib = {k: v for k, v in dict(np.load("models/transformers/calib_tokens.npz")).items() if k in {i.name for i in model.graph.input}}
    pruned, report = onnxprune.prune(model, calib, ratio=0.3, sequential=True)
    _, plain = onnxprune.prune(model, calib, ratio=0.3, sequential=True, rechoose=False)
    assert [(r.name, r.kept) for r in report.spaces] == [(r.name, r.kept) for r in plain.spaces]
    feeds = {k: v[:2] for k, v in calib.items()}
    out = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert out.shape == ref.shape and relative_l2(ref, out) < 0.5


def test_nothing_chosen_again_without_held_out_samples() -> None:
    """The guard needs held-out rows: without them the plan's units stay (the refit still runs)."""
    calib = "models/data/fmnist_calib.npz"
    guarded = onnxprune.prune("models/vgg_bn.ts.onnx", calib, flops=0.5, sequential=True, allocation="global").report
    blind = onnxprune.prune("models/vgg_bn.ts.onnx", calib, flops=0.5, sequential=True, allocation="global", verify_samples=0).report
    assert guarded.sequential["rechosen"]
    assert blind.sequential["sites"] and blind.sequential["rechosen"] == []


def test_a_rejected_rechosen_refit_is_refitted_with_the_plans_units(monkeypatch) -> None:
    """The model guard refuses the pass with units chosen again: a second pass without it is kept."""
    import onnxprune.refit as refit

    guard = refit.better_than_one_shot
    monkeypatch.setattr(refit, "better_than_one_shot", lambda p, plan, model, result, error: not result.rechosen and guard(p, plan, model, result, error))
    report = onnxprune.prune("models/vgg_bn.ts.onnx", "models/data/fmnist_calib.npz", flops=0.5, sequential=True, allocation="global").report
    assert report.sequential["kept"] and report.sequential["rechosen"] == []
    assert "units chosen again was not kept" in report.sequential["retried"]
    assert "refitted with the plan's units" in report.sequential_note()
    assert not any("chosen again" in w for w in report.warnings)  # not a problem of the user's: no warning


def test_a_failing_rechoose_falls_back_to_the_plain_refit(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(decisions, "rechosen", broken)
    model = random_mlp(widths=(12, 20, 16, 5), seed=2)
    x = np.random.default_rng(0).standard_normal((300, 12)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.4, sequential=True)
    assert report.sequential["sites"] and report.sequential["rechosen"] == []
    assert any("with units chosen again failed (ValueError: planted)" in w for w in report.warnings)
    assert run(pruned, x[:5]).shape == (5, 5)


def _zoo(name: str):
    model = onnx.load(f"models/zoo/{name}.ts.onnx")
    return model, {model.graph.input[0].name: np.load("models/zoo/calib.npz")["input"]}


def _spread(prepared, spaces) -> tuple[list, list]:
    """(spaces whose sites lie in several segments, all segments) of the pass."""
    from onnxprune.segments import cut_segments

    segments = cut_segments(prepared.original, sorted({t for s in spaces for t in s.sites}), prepared.shapes)
    segment_of = {t: i for i, segment in enumerate(segments) for t in segment.sites}
    return [s for s in spaces if len({segment_of[t] for t in s.sites}) > 1], segments


def test_one_producer_spaces_across_segments_are_chosen_again_but_residual_streams_not() -> None:
    """An SE expansion (sites at the gate's pool and at the projection, in two segments) is
    chosen again; a residual stream across segments is not."""
    from onnxprune.rechoose import rechoosable, residual

    for name, expected in (("effnets", True), ("resnet18s", False)):
        prepared = prepare(*_zoo(name))
        spread, segments = _spread(prepared, prepared.analysis.prunable)
        chosen = {s.id for s in rechoosable(prepared.analysis.prunable, segments, set(), prepared.index)}
        assert spread, name
        assert all((s.id in chosen) != residual(s, prepared.index) for s in spread), name
        assert any(s.id in chosen for s in spread) == expected, name


def test_running_ahead_measures_the_later_sites_of_the_original(monkeypatch) -> None:
    """The choice at an SE expansion's first site reads moments at all its sites; at a later site
    the original's side equals its calibration statistics (the pass runs ahead to it)."""
    model, calib = _zoo("effnets")
    prepared = prepare(model, calib)
    stats = calibration_statistics(prepared)
    spread, _ = _spread(prepared, prepared.analysis.prunable)
    seen: dict[int, dict] = {}
    original = decisions.PassDecisions.rechoose

    def spy(self, spaces, moments, caches):
        for space in spaces:
            seen[space.id] = {t: moments[t][0] for t in space.sites}
        return original(self, spaces, moments, caches)

    monkeypatch.setattr(decisions.PassDecisions, "rechoose", spy)
    _, report = onnxprune.prune(model, calib, ratio=0.3, sequential=True, seed=0)
    assert report.sequential["kept"] is not None
    checked = 0
    from onnxprune.rechoose import residual

    for space in spread:
        if residual(space, prepared.index):
            continue
        assert set(seen[space.id]) == set(space.sites)
        for tensor in space.sites[1:]:
            m, s = seen[space.id][tensor], stats[tensor]
            assert m.count == s.count  # every calibration sample (64 - 7 held out) went through the pass
            np.testing.assert_allclose(m.mean_o, s.mean(), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(m.cov_oo, s.covariance(), rtol=1e-3, atol=1e-4 * np.abs(s.covariance()).max())
            checked += 1
    assert checked


def test_running_ahead_keeps_counts_and_the_guard_on_an_se_net() -> None:
    """effnets with units chosen again across segments: the same MACs as without re-choosing, a
    model that runs in onnxruntime, and a held-out error no higher than one-shot's."""
    model, calib = _zoo("effnets")
    x = calib[model.graph.input[0].name][:16]
    results = {flag: onnxprune.prune(model, calib, ratio=0.3, sequential=True, rechoose=flag, seed=0) for flag in (True, False)}
    (pruned, report), (_, plain) = results[True], results[False]
    assert report.macs_after == plain.macs_after and report.params_after == plain.params_after
    errors = report.sequential["heldout_model_error"]
    assert errors is not None and (not report.sequential["kept"] or errors[1] <= errors[0])
    assert relative_l2(run(model, x), run(pruned, x)) < 1.0


def _concat_model() -> onnx.ModelProto:
    """Two 1x1 conv branches (3 and 2 channels) concatenated and read by a 1x1 conv: the Concat
    output is a site shared by both branches' spaces."""
    rng = np.random.default_rng(0)
    weights = {"wa": rng.standard_normal((3, 4, 1, 1)), "wb": rng.standard_normal((2, 4, 1, 1)), "wc": rng.standard_normal((4, 5, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Conv", ["x", "wb"], ["b"], name="conv_b"), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Concat", ["ra", "rb"], ["cat"], axis=1), helper.make_node("Conv", ["cat", "wc"], ["y"], name="conv_c")]
    graph = helper.make_graph(nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_branch_at_a_shared_site_is_chosen_beside_the_other_branchs_kept_channels() -> None:
    """Branch A's first channel copies branch B's second: given B's kept channels it explains
    nothing new, so A keeps its other two, although on its own channels alone it ranks first."""
    model = _concat_model()
    analysis, index = analyse(model), GraphIndex(model)
    assert set(shared_sites(analysis)) == {"cat"}
    space_a = next(s for s in analysis.prunable if s.n == 3)
    rng = np.random.default_rng(1)
    b = rng.standard_normal((2000, 2))
    columns = np.column_stack([3 * b[:, 1], rng.standard_normal((2000, 2)), b])  # a0 = 3 b1, the largest channel
    cov = np.cov(columns.T, bias=True)
    moments = {"cat": CrossMoments(2000, columns.mean(0), columns.mean(0), cov, cov, cov)}  # the pruned run shows the original
    beside = greedy_cross_selection(space_a, 2, moments, index, {"cat": SharedColumns(np.arange(5), np.array([3, 4]))})
    assert sorted(beside.tolist()) == [1, 2]
    own = space_a.tensors["cat"].element_positions_of(np.arange(3))
    alone = forward_selection([cov[np.ix_(own, own)]], [cov[np.ix_(own, own)] @ consumer_metric(space_a, "cat", index, own)], 2)
    assert 0 in alone.tolist()


def test_branches_at_shared_sites_are_chosen_again_on_an_inception_net() -> None:
    """inception_fmnist (four branches per block joined by a Concat): branches at shared sites
    are chosen again, the MACs are those without re-choosing, the model runs in onnxruntime
    close to the original, and its held-out error is no higher than one-shot's."""
    from onnxprune.rechoose import rechoosable

    model = onnx.load("models/inception_fmnist.ts.onnx")
    calib = {"input": np.load("models/data/fmnist_calib.npz")["input"][:256]}
    prepared = prepare(model, calib)
    shared = set(shared_sites(prepared.analysis))
    _, segments = _spread(prepared, prepared.analysis.prunable)
    at_shared = {s.name for s in rechoosable(prepared.analysis.prunable, segments, set(), prepared.index, shared) if set(s.tensors) & shared}
    assert len(at_shared) >= 8
    results = {flag: onnxprune.prune(model, calib, flops=0.5, sequential=True, rechoose=flag, seed=0) for flag in (True, False)}
    (pruned, report), (_, plain) = results[True], results[False]
    assert report.macs_after == plain.macs_after and report.params_after == plain.params_after
    assert set(report.sequential["rechosen"]) & at_shared
    errors = report.sequential["heldout_model_error"]
    assert report.sequential["kept"] and errors[1] <= errors[0]
    x = np.load("models/data/fmnist_test.npz")["input"][:64]
    assert relative_l2(run(model, x), run(pruned, x)) < 0.5


def test_backward_selection_matches_a_direct_greedy_reference() -> None:
    """Removal, one unit at a time, of the unit whose removal loses the least explained energy
    (every site summed); forced units stay."""
    rng = np.random.default_rng(4)
    rows, n = 900, 10
    original = rng.standard_normal((rows, n)) @ rng.standard_normal((n, n))
    sites = []
    for _ in range(2):
        pruned = original + 0.4 * rng.standard_normal((rows, n))
        metric = rng.standard_normal((n, 4))
        cov = np.cov(pruned.T, bias=True)
        sites.append((cov, (pruned - pruned.mean(0)).T @ (original - original.mean(0)) / rows @ metric))
    got = backward_selection([c for c, _ in sites], [t for _, t in sites], kept=6, first=[2])
    left = list(range(n))
    for _ in range(4):
        kept_energy = {j: sum(_explained(c, t, [u for u in left if u != j]) for c, t in sites) for j in left if j != 2}
        left.remove(max(kept_energy, key=kept_energy.get))
    assert got.tolist() == left


def test_backward_selection_of_blocks_matches_a_direct_greedy_reference() -> None:
    """Removing heads: each removal loses the least of the blocks' explained energy."""
    units, block = 6, 2
    cov, cross = _block_moments(5, 700, units, block)
    got = backward_selection([cov], [cross], kept=4, blocks=[block])
    left = list(range(units))
    for _ in range(2):
        kept_energy = {j: _explained(cov, cross, _elements([u for u in left if u != j], block)) for j in left}
        left.remove(max(kept_energy, key=kept_energy.get))
    assert got.tolist() == left


def test_greedy_selection_removes_a_copy_and_a_dead_unit_when_keeping_most() -> None:
    """Keeping most units takes the removal pass: exact copies and units that explain nothing go
    first, as in the adding pass."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((500, 7))
    x = np.hstack([x, 3 * x[:, 1:2], np.zeros((500, 1))])  # unit 7 copies unit 1, unit 8 is dead
    cov = np.cov(x.T, bias=True)
    kept = greedy_selection([cov], [cov], kept=7)
    assert len(kept) == 7 and 8 not in kept
    assert not {1, 7} <= set(kept.tolist())
    assert sorted(kept.tolist()) == sorted(forward_selection([cov], [cov], kept=7).tolist())
