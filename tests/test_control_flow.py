"""Subgraphs (If/Loop/Scan bodies) read tensors of the enclosing graph without listing them as
inputs: the analysis must see those reads (a space whose units a body reads is pinned) and the
rewrite must keep the nodes that compute them (tf2onnx writes a Keras GRU as a Loop whose body
reads a ReverseSequence's output from outside)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxprune
from builders import GraphBuilder, relative_l2, run

RNG = np.random.default_rng(41)


def normal(*shape):
    return (RNG.normal(size=shape) * 0.5).astype(np.float32)


def body_reading(outer: str, name: str) -> onnx.GraphProto:
    """A branch whose only node reads `outer` from the enclosing graph."""
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)
    return helper.make_graph([helper.make_node("Identity", [outer], [f"{name}_y"], name=f"{name}_id")], name, [], [out])


def model_with_if(read_units: bool) -> onnx.ModelProto:
    """conv_a -> Relu -> conv_b -> GAP -> Gemm, plus an If whose branches read, from outside,
    either conv_a's units (`read_units`) or a Neg of the input that nothing else reads; the If's
    output is added to the Gemm's output after a ReduceMean."""
    g = GraphBuilder([1, 2, 6, 6])
    w, b = normal(5, 2, 3, 3), normal(5)
    w[4], b[4] = w[1], b[1]
    a = g.op("Relu", [g.conv("x", w, b, name="conv_a", pads=[1, 1, 1, 1])])
    c = g.conv(a, normal(3, 5, 1, 1), normal(3), name="conv_b")
    logits = g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c])]), normal(3, 2), normal(2), name="fc")
    outer = a if read_units else g.op("Neg", ["x"], name="neg")
    cond = g.const(np.array(True), dtype=np.bool_)
    g.nodes.append(helper.make_node("If", [cond], ["branch"], name="if", then_branch=body_reading(outer, "then"),
                                    else_branch=body_reading(outer, "other")))
    return g.build(g.op("Add", [logits, g.op("ReduceMean", ["branch"], keepdims=0)]), [None, 2])


def test_units_read_by_a_subgraph_pin_their_space():
    spaces = {s.name: s for s in onnxprune.inspect_model(model_with_if(True), input_shapes={"x": (2, 2, 6, 6)}).spaces}
    assert any("If 'if'" in reason for reason in spaces["conv_a"].pinned)


def test_a_node_only_a_subgraph_reads_is_kept_by_the_rewrite():
    model = model_with_if(False)
    x = RNG.normal(size=(64, 2, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    assert {r.name: r.kept for r in report.spaces}["conv_a"] == 4  # the planted copy goes
    assert any(n.name == "neg" for n in pruned.graph.node)
    fresh = RNG.normal(size=(3, 2, 6, 6)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def test_layers_only_inside_an_if_are_named_when_nothing_can_be_pruned(tmp_path, capsys):
    """A merged decoder (optimum's If on use_cache_branch) holds its layers in the branches: the
    refusal names the If and the way out, not only "no Conv/Gemm/MatMul with constant weights"."""
    from builders import cli

    def branch(name: str) -> onnx.GraphProto:
        weight = onnx.numpy_helper.from_array(normal(4, 6), f"{name}_w")
        node = helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [weight])
    node = helper.make_node("If", ["use_cache_branch"], ["y"], name="optimum::if", then_branch=branch("with_past"),
                            else_branch=branch("without_past"))
    graph = helper.make_graph([node], "merged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                                 helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert any("2 layers inside If 'optimum::if'" in note for note in onnxprune.inspect_model(model).notes)
    onnx.save(model, tmp_path / "merged.onnx")
    np.savez(tmp_path / "calib.npz", x=normal(32, 4), use_cache_branch=np.zeros(32, bool))
    code, _, err = cli([str(tmp_path / "merged.onnx"), "--calib", str(tmp_path / "calib.npz"), "--ratio", "0.2"], capsys)
    assert code == 2 and "layers inside If 'optimum::if' are not analysed" in err and "decoder_with_past" in err


def test_two_parts_side_by_side_compute_what_each_computes_alone():
    """The sequential pass's joint session: a model and a copy whose names (an If body's outer
    reads included) are prefixed run side by side in one graph."""
    from onnxprune.segments import side_by_side

    model = model_with_if(False)
    x, y = (RNG.normal(size=(4, 2, 6, 6)).astype(np.float32) for _ in range(2))
    both = side_by_side(onnx.ModelProto.FromString(model.SerializeToString()), onnx.ModelProto.FromString(model.SerializeToString()), "p/")
    onnx.checker.check_model(both)
    assert len(both.graph.output) == 2 * len(model.graph.output)
    session = onnxprune.calibrate.make_session(both)
    first, second = session.run(None, {"x": x, "p/x": y})
    np.testing.assert_array_equal(first, run(model, x))
    np.testing.assert_array_equal(second, run(model, y))


def test_the_sequential_pass_runs_segments_holding_an_if():
    model = model_with_if(False)
    x = RNG.normal(size=(64, 2, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, sequential=True)
    assert {r.name: r.kept for r in report.spaces}["conv_a"] == 4
    assert report.sequential.get("segments", 0) > 0
    fresh = RNG.normal(size=(3, 2, 6, 6)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4
