"""A MatMul of two activations whose units sit on a matrix axis: the right operand's columns
(single-head attention's probs @ V, an OCR decoder's glimpse over a feature map) and the left
operand's rows (a non-local block's features @ affinity) pass to the output; contracted axes pin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import relative_l2, run

RNG = np.random.default_rng(5)


def _w(*shape: int) -> np.ndarray:
    return (RNG.normal(size=shape) * 0.5).astype(np.float32)


def attention(left_rows: bool) -> onnx.ModelProto:
    """x [N, T, 8] -> single-head attention with V [N, T, 6] whose unit 5 copies unit 2. With
    `left_rows` the values are transposed first and multiply the probabilities from the left,
    (V^T [N, 6, T]) @ P^T, then transposed back: the units on the left operand's rows."""
    wv = _w(8, 6)
    wv[:, 5] = wv[:, 2]
    inits = [numpy_helper.from_array(a, n) for a, n in [(_w(8, 4), "wq"), (_w(8, 4), "wk"), (wv, "wv"), (_w(6, 8), "wo")]]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1)]
    if left_rows:
        nodes += [helper.make_node("Transpose", ["v"], ["vt"], perm=[0, 2, 1]), helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["vt", "pt"], ["ot"]), helper.make_node("Transpose", ["ot"], ["o"], perm=[0, 2, 1])]
    else:
        nodes += [helper.make_node("MatMul", ["p", "v"], ["o"])]
    nodes += [helper.make_node("MatMul", ["o", "wo"], ["y"])]
    graph = helper.make_graph(nodes, "single_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("left_rows", [False, True])
def test_the_values_columns_are_units_and_a_planted_copy_goes_exactly(left_rows: bool) -> None:
    model = attention(left_rows)
    x = RNG.normal(size=(64, 5, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    rows = {s.name: s for s in report.spaces}
    values = next(s for s in rows.values() if s.units == 6)
    assert not values.pinned and values.kept == 5, values
    assert all(s.pinned for s in rows.values() if s.units == 4)  # q and k: q kᵀ contracts their units
    fresh = RNG.normal(size=(4, 7, 8)).astype(np.float32)  # another length than the calibration's
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5
