"""The stream allocation: each space's energies scaled by the share of its consumers' output in the
residual stream they join, so a small branch added to a large stream is pruned harder."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import cli, random_mlp, relative_l2, run
from onnxprune.graph import GraphIndex
from onnxprune.preparation import prepare
from onnxprune.streams import consumer_streams, measure_stream_gains, stream_tensor


def residual_mlp(skip: float = 4.0, seed: int = 0, between: str | None = None) -> onnx.ModelProto:
    """x -> fc1 -> Relu -> fc2 (+ bias) [-> `between`] -> + skip * x -> fc3 -> Relu -> fc4 -> y: the
    first block's units (fc1) feed a branch added to a residual stream, the second block's (fc3) feed the output."""
    rng = np.random.default_rng(seed)
    w = {name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
         for name, shape in (("w1", (16, 32)), ("w2", (32, 16)), ("w3", (16, 24)), ("w4", (24, 6)))}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.full(16, 0.1, np.float32), "b2"), numpy_helper.from_array(np.float32(skip), "skip"),
              numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y2"], name="fc2"), helper.make_node("Add", ["y2", "b2"], ["y2b"], name="bias2")]
    branch = "y2b"
    if between is not None:
        nodes.append(helper.make_node(between, [branch, "shape"] if between == "Reshape" else [branch], ["y2c"], name="between"))
        branch = "y2c"
    nodes += [helper.make_node("Mul", ["x", "skip"], ["xs"], name="scale"), helper.make_node("Add", [branch, "xs"], ["s"], name="residual"),
              helper.make_node("MatMul", ["s", "w3"], ["h3"], name="fc3"), helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
              helper.make_node("MatMul", ["r3", "w4"], ["y"], name="fc4")]
    graph = helper.make_graph(nodes, "residual_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calib(n: int = 600, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


def test_the_stream_is_found_through_bias_and_shape_ops_only() -> None:
    index = GraphIndex(residual_mlp(between="Reshape"))
    assert stream_tensor(index, "y2") == "s"
    assert stream_tensor(index, "y") is None  # a graph output
    assert stream_tensor(index, "h3") is None  # a nonlinearity comes first
    assert stream_tensor(GraphIndex(residual_mlp(between="Relu")), "y2") is None


def test_a_tensor_read_twice_has_no_single_stream() -> None:
    model = residual_mlp()
    model.graph.output.append(helper.make_tensor_value_info("y2b", TensorProto.FLOAT, ["N", 16]))
    model.graph.node.append(helper.make_node("Neg", ["y2"], ["y2n"], name="second_reader"))
    assert stream_tensor(GraphIndex(model), "y2") is None


def test_gains_are_the_measured_energy_shares() -> None:
    model, calib = residual_mlp(), _calib()
    prepared = prepare(model, calib, verify_samples=0)
    pairs = consumer_streams(prepared.analysis, prepared.index)
    named = {space.name: pairs[space.id] for space in prepared.analysis.prunable}
    assert named == {"fc1": [("y2", "s")], "fc3": [("y", None)]}
    gains = measure_stream_gains(prepared.original, prepared.analysis, prepared.index, prepared.calib_data, 64, samples=100)
    x = calib["x"][:100].astype(np.float64)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    y2 = np.maximum(x @ w["w1"], 0) @ w["w2"]
    expected = np.sum(y2 ** 2) / np.sum((y2 + w["b2"] + 4.0 * x) ** 2)
    by_name = {space.name: gains.gains[space.id] for space in prepared.analysis.prunable}
    assert gains.samples == 100
    assert abs(by_name["fc1"] - expected) < 1e-4 * expected and by_name["fc3"] == 1.0
    assert 0.01 < expected < 0.5  # the branch is a small part of the stream


def test_a_branch_on_a_large_stream_is_pruned_harder_with_the_same_budget() -> None:
    model, calib = residual_mlp(skip=8.0), _calib()
    fresh = np.random.default_rng(7).standard_normal((200, 16)).astype(np.float32)
    pruned_g, report_g = onnxprune.prune(model, calib, ratio=0.4, allocation="global")
    pruned_s, report_s = onnxprune.prune(model, calib, ratio=0.4, allocation="stream")
    kept_g = {r.name: r.kept for r in report_g.spaces if not r.pinned}
    kept_s = {r.name: r.kept for r in report_s.spaces if not r.pinned}
    assert report_s.units_after == report_g.units_after
    assert kept_s["fc1"] < kept_g["fc1"] and kept_s["fc3"] > kept_g["fc3"]
    reference = run(model, fresh)
    # what the rule predicts: the branch's error is small next to the stream, so the output is closer
    assert relative_l2(reference, run(pruned_s, fresh)) < relative_l2(reference, run(pruned_g, fresh))
    assert report_s.allocation["stream"]["gains"].keys() == {"fc1"}
    assert "join a residual stream" in report_s.markdown()


def test_without_a_residual_stream_the_rule_is_the_global_threshold() -> None:
    model = random_mlp()
    calib = {"x": np.random.default_rng(2).standard_normal((400, 20)).astype(np.float32)}
    pruned_g, report_g = onnxprune.prune(model, calib, ratio=0.3, allocation="global")
    pruned_s, report_s = onnxprune.prune(model, calib, ratio=0.3, allocation="stream")
    assert [r.kept for r in report_s.spaces] == [r.kept for r in report_g.spaces]
    x = calib["x"][:50]
    np.testing.assert_array_equal(run(pruned_s, x), run(pruned_g, x))
    assert report_s.allocation["stream"]["gains"] == {} and "the global rule" in report_s.markdown()


def test_cli_stream_allocation(tmp_path, capsys) -> None:
    model_path, calib_path, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "p.onnx"
    onnx.save(residual_mlp(), model_path)
    np.savez(calib_path, **_calib())
    code, stdout, stderr = cli([model_path, "--calib", calib_path, "-o", out, "--ratio", "0.3", "--allocation", "stream",
                                "--round-to", "1"], capsys)
    assert code == 0, stderr
    assert "join a residual stream" in stdout
    fresh = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)
    assert relative_l2(run(residual_mlp(), fresh), run(onnx.load(out), fresh)) < 0.5


def test_a_kv_cache_llama_finds_every_stream_and_prunes_with_them() -> None:
    """Every FFN and attention block of the committed tiny Llama (with KV-cache inputs) adds its
    output to the residual stream; the pruned model runs in onnxruntime close to the original."""
    model, calib = "models/transformers/llama_tiny_kv.dynamo.onnx", "models/transformers/calib_tokens_kv.npz"
    pruned, report = onnxprune.prune(model, calib, params=0.2, allocation="stream")
    gains = report.allocation["stream"]["gains"]
    assert len(gains) == len([r for r in report.spaces if not r.pinned and r.derived_from is None]) and all(0 < g < 1 for g in gains.values())
    onnx.checker.check_model(pruned)
    _, global_report = onnxprune.prune(model, calib, params=0.2, allocation="global")
    assert report.params_after <= global_report.params_after * 1.02  # the same budget
    assert report.fidelity[0].relative_l2 < 0.5


def test_auto_runs_without_the_stream_candidate_when_the_energies_cannot_be_measured(monkeypatch) -> None:
    """A model onnxruntime cannot instrument loses auto's stream candidate, not the run; asked
    for explicitly, the rule's failure is the run's one-line error."""
    import pytest

    import onnxprune.allocate as allocate
    from onnxprune.errors import ModelError

    def refuse(*args, **kwargs):
        raise ModelError("onnxruntime failed measuring the residual streams: planted")

    monkeypatch.setattr(allocate, "measure_stream_gains", refuse)
    model, calib = residual_mlp(), _calib()
    pruned, report = onnxprune.prune(model, calib, ratio=0.3, allocation="auto")
    assert set(report.allocation["heldout_error"]) == {"global", "tempered", "uniform"}
    assert "stream candidate was left out" in report.markdown() and "planted" in report.allocation["stream"]["failed"]
    fresh = np.random.default_rng(3).standard_normal((50, 16)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 0.5
    with pytest.raises(ModelError, match="planted"):
        onnxprune.prune(model, calib, ratio=0.3, allocation="stream")
