"""C2f / CSP split halves (issue 14): a bottleneck conv whose output is added back onto one half
of a Split writes that half of the split producer's space, so it is one of the space's producers
(sliced where that half is pruned) instead of pinning the space."""

from __future__ import annotations

import numpy as np
import onnx

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse

RNG = np.random.default_rng(17)
C = 4  # channels per half


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def c2f_block(plant: bool = True) -> onnx.ModelProto:
    """stem -> cv1 (2C) -> SiLU -> Split [C, C] -> y0, y1; y2 = y1 + m.cv2(m.cv1(y1)) -> Concat
    [y0, y1, y2] -> cv2 -> GAP -> Gemm. With `plant`, unit 3 of the second half is a copy of its
    unit 1 in both producers that write it (cv1 row C+3 and m.cv2 row 3)."""
    g = GraphBuilder([1, 3, 8, 8])
    stem = silu(g, g.conv("x", normal(6, 3, 3, 3), normal(6), name="stem", pads=[1, 1, 1, 1]))
    w1, b1 = normal(2 * C, 6, 1, 1), normal(2 * C)
    wm2, bm2 = normal(C, C, 3, 3), normal(C)
    if plant:
        w1[C + 3], b1[C + 3] = w1[C + 1], b1[C + 1]
        wm2[3], bm2[3] = wm2[1], bm2[1]
    h = silu(g, g.conv(stem, w1, b1, name="cv1"))
    g.nodes.append(onnx.helper.make_node("Split", [h, g.const(np.array([C, C]), dtype=np.int64)], ["y0", "y1"], name="split", axis=1))
    m = silu(g, g.conv("y1", normal(C, C, 3, 3), normal(C), name="m_cv1", pads=[1, 1, 1, 1]))
    m = silu(g, g.conv(m, wm2, bm2, name="m_cv2", pads=[1, 1, 1, 1]))
    y2 = g.op("Add", ["y1", m], name="shortcut")
    cat = g.op("Concat", ["y0", "y1", y2], axis=1)
    c = silu(g, g.conv(cat, normal(5, 3 * C, 1, 1), normal(5), name="cv2"))
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    return g.build(g.gemm(f, normal(5, 3), normal(3), name="fc"), ["N", 3])


def test_the_bottleneck_conv_is_a_producer_of_the_split_space():
    space = next(s for s in analyse(c2f_block()).spaces if s.name == "cv1")
    assert not space.pinned and space.n == 2 * C
    assert space.producers == ["cv1", "m_cv2"]
    assert {c.node for c in space.consumers} == {"m_cv1", "cv2"}


def test_a_planted_duplicate_in_a_c2f_half_is_removed_exactly():
    model = c2f_block()
    x = RNG.normal(size=(128, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "cv1")
    assert (row.kept, row.units) == (2 * C - 1, 2 * C)
    assert initializer(pruned, "cv1", 1).shape[0] == 2 * C - 1
    assert initializer(pruned, "m_cv2", 1).shape[0] == C - 1
    assert initializer(pruned, "m_cv1", 1).shape[1] == C - 1
    assert initializer(pruned, "cv2", 1).shape[1] == 3 * C - 2  # the unit sat in two Concat inputs
    fresh = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4
