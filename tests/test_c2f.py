"""C2f / CSP split halves (issue 14): a bottleneck conv whose output is added back onto one half
of a Split writes that half of the split producer's space, so it is one of the space's producers
(sliced where that half is pruned) instead of pinning the space."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse

RNG = np.random.default_rng(17)
C = 4  # channels per half


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def silu(g: GraphBuilder, x: str) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def torchscript_chunk(g: GraphBuilder, h: str) -> None:
    """TorchScript's x.chunk(2, 1): the split point ((C + 1) / 2) is computed from Shape."""
    one = g.const(np.array([1]), dtype=np.int64)
    size = g.op("Gather", [g.op("Shape", [h]), one], axis=0)
    half = g.op("Div", [g.op("Add", [size, one]), g.const(np.array([2]), dtype=np.int64)])
    middle, end = g.op("Mul", [half, one]), g.op("Mul", [half, g.const(np.array([2]), dtype=np.int64)])
    g.nodes.append(onnx.helper.make_node("Slice", [h, g.const(np.array([0]), dtype=np.int64), middle, one], ["y0"], name="slice0"))
    g.nodes.append(onnx.helper.make_node("Slice", [h, middle, end, one], ["y1"], name="slice1"))


def c2f_block(plant: bool = True, chunk: str = "split") -> onnx.ModelProto:
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
    if chunk == "split":
        g.nodes.append(onnx.helper.make_node("Split", [h, g.const(np.array([C, C]), dtype=np.int64)], ["y0", "y1"], name="split", axis=1))
    else:
        torchscript_chunk(g, h)
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


@pytest.mark.parametrize("chunk", ["split", "torchscript"])
def test_a_planted_duplicate_in_a_c2f_half_is_removed_exactly(chunk):
    model = c2f_block(chunk=chunk)
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


def test_a_torchscript_chunk_point_becomes_constant_slice_bounds():
    """The chunk point is computed from the units' axis size: the analysis reads it, and the
    rewrite replaces the Slices' computed bounds with the pruned windows (the Shape chain dies)."""
    model = c2f_block(chunk="torchscript")
    report = onnxprune.inspect_model(model, input_shapes={"x": (2, 3, 8, 8)})  # the Slices' widths need static shapes
    assert [s.pinned for s in report.spaces if s.name == "cv1"] == [[]]
    x = RNG.normal(size=(128, 3, 8, 8)).astype(np.float32)
    pruned, _ = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    assert "Shape" not in [n.op_type for n in pruned.graph.node]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    bounds = {n.name: [inits[i].tolist() for i in n.input[1:3]] for n in pruned.graph.node if n.op_type == "Slice"}
    assert bounds == {"slice0": [[0], [C]], "slice1": [[C], [2 * C - 1]]}
    fresh = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)  # another batch size
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def test_a_chunk_point_read_elsewhere_still_pins():
    """The axis size also feeds something that is not a Slice bound of that tensor: pinned."""
    model = c2f_block(chunk="torchscript")
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    cast = onnx.helper.make_node("Cast", [gather.output[0]], ["size_f"], to=onnx.TensorProto.FLOAT)
    out = model.graph.output[0].name
    last = next(n for n in model.graph.node if out in n.output)
    last.output[0] = "logits"
    model.graph.node.extend([cast, onnx.helper.make_node("Add", ["logits", "size_f"], [out])])
    report = onnxprune.inspect_model(model, input_shapes={"x": (2, 3, 8, 8)})
    reasons = next(s for s in report.spaces if s.name == "cv1").pinned
    assert len(reasons) == 1 and f"reads the size of the units' axis (Gather '{gather.name}')" in reasons[0]
