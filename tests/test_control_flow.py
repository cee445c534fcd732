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
