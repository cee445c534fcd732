"""Recurrent ops (issue 14): an LSTM/GRU/RNN pins only the space that feeds it; the conv front
end of a CRNN stays prunable."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from builders import GraphBuilder, relative_l2, run

RNG = np.random.default_rng(21)
HIDDEN = 5


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def crnn(op: str) -> onnx.ModelProto:
    """conv_a -> conv_b -> [W, N, C*H] sequence -> LSTM/GRU/RNN -> Gemm per step. conv_a's unit 5
    is a planted copy of unit 2 (same weights and bias), so it can be removed exactly."""
    g = GraphBuilder([1, 1, 8, 16])
    wa, ba = normal(6, 1, 3, 3), normal(6)
    wa[5], ba[5] = wa[2], ba[2]
    a = g.op("Relu", [g.conv("x", wa, ba, name="conv_a", pads=[1, 1, 1, 1])])
    b = g.op("Relu", [g.conv(a, normal(4, 6, 3, 3), normal(4), name="conv_b", pads=[1, 1, 1, 1])])
    seq = g.op("Reshape", [g.op("Transpose", [b], perm=[3, 0, 1, 2]), g.const(np.array([16, -1, 32]), dtype=np.int64)])
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    weights = [g.const(normal(1, gates * HIDDEN, 32)), g.const(normal(1, gates * HIDDEN, HIDDEN)), g.const(normal(1, 2 * gates * HIDDEN))]
    g.nodes.append(helper.make_node(op, [seq, *weights], ["rnn_y"], name="rnn", hidden_size=HIDDEN))
    y = g.op("Reshape", [g.op("Squeeze", ["rnn_y", g.const(np.array([1]), dtype=np.int64)]), g.const(np.array([-1, HIDDEN]), dtype=np.int64)])
    return g.build(g.gemm(y, normal(HIDDEN, 3), normal(3), name="fc"), [None, 3])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_a_recurrent_op_pins_only_the_space_feeding_it(op):
    model = crnn(op)
    report = onnxprune.inspect_model(model, input_shapes={"x": (2, 1, 8, 16)})
    pinned = {s.name: s.pinned for s in report.spaces if s.pinned}
    assert pinned["conv_b"] == [f"recurrent {op} 'rnn' reads these units: its input weights are not pruned"]
    assert not next(s for s in report.spaces if s.name == "conv_a").pinned


def test_the_conv_front_end_of_a_crnn_prunes_exactly():
    model = crnn("LSTM")
    x = RNG.normal(size=(64, 1, 8, 16)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    row = next(r for r in report.spaces if r.name == "conv_a")
    assert (row.kept, row.units) == (5, 6)
    fresh = RNG.normal(size=(4, 1, 8, 16)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4
