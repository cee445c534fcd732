"""Units carried several times side by side: a Reshape that merges the axes *before* the unit
axis into it puts each unit once per index of those axes (a bidirectional LSTM's [T, N, 2, H]
-> [T, N, 2H]; Keras's channels-last flatten [N, H, W, C] -> [N, H*W*C]). The copies of a unit
are one unit of that many elements, up to MAX_COPIES; more pins."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from builders import GraphBuilder, relative_l2, run
from onnxprune.rules.shapes import MAX_COPIES

RNG = np.random.default_rng(43)


def channels_last_flatten(size: int):
    """conv (planted copy: channel 3 = channel 1) -> Relu -> NHWC -> Reshape [N, size*size*4] -> Gemm."""
    g = GraphBuilder([1, 2, size, size])
    w, b = RNG.normal(size=(4, 2, 3, 3)).astype(np.float32), RNG.normal(size=4).astype(np.float32)
    w[3], b[3] = w[1], b[1]
    a = g.op("Relu", [g.conv("x", w, b, name="conv", pads=[1, 1, 1, 1])])
    flat = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 3, 1]), g.const(np.array([-1, size * size * 4]), dtype=np.int64)])
    return g.build(g.gemm(flat, RNG.normal(size=(size * size * 4, 3)).astype(np.float32), np.zeros(3, np.float32), name="fc"), [None, 3])


def test_a_channels_last_flatten_into_a_gemm_prunes_exactly():
    model = channels_last_flatten(2)
    x = RNG.normal(size=(64, 2, 2, 2)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    assert {r.name: r.kept for r in report.spaces}["conv"] == 3
    fc = next(n for n in pruned.graph.node if n.name == "fc")
    assert next(list(t.dims) for t in pruned.graph.initializer if t.name == fc.input[1]) == [2 * 2 * 3, 3]
    fresh = RNG.normal(size=(4, 2, 2, 2)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


@pytest.mark.parametrize("size,pinned", [(2, False), (3, True)])
def test_more_copies_than_the_limit_pin(size, pinned):
    assert (size * size > MAX_COPIES) == pinned
    spaces = {s.name: s for s in onnxprune.inspect_model(channels_last_flatten(size), input_shapes={"x": (2, 2, size, size)}).spaces}
    assert bool(spaces["conv"].pinned) == pinned
