"""Issue 3: coupled spaces (residual streams, inverted residuals with depthwise convs, Concat)
and pinning. Planted exact redundancy must be found and removed without changing the output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, relative_l2, run

RNG = np.random.default_rng(7)


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def kept(report, name: str) -> tuple[int, int]:
    row = next(r for r in report.spaces if r.name == name)
    return row.kept, row.units


def prune_and_compare(model, x_calib, **options):
    pruned, report = onnxprune.prune(model, {"x": x_calib}, **options)
    onnx.checker.check_model(pruned, full_check=True)
    fresh = RNG.normal(size=(6, *x_calib.shape[1:])).astype(np.float32)
    return pruned, report, relative_l2(run(model, fresh), run(pruned, fresh))


def residual_model():
    """conv_a -> relu -> [conv1 -> BN -> relu -> conv2] + skip -> relu -> conv_out -> GAP -> Flatten -> Gemm.
    Unit 5 of the residual stream is 2x unit 1 in both producers; unit 6 of the block is 2x unit 0."""
    g = GraphBuilder([1, 3, 8, 8])
    wa, ba = normal(8, 3, 3, 3), normal(8)
    wa[5], ba[5] = 2 * wa[1], 2 * ba[1]
    r = g.op("Relu", [g.conv("x", wa, ba, name="conv_a", pads=[1, 1, 1, 1])])
    w1, b1 = normal(8, 8, 3, 3), normal(8)
    w1[6], b1[6] = 2 * w1[0], 2 * b1[0]
    # BN with the same scale for units 0 and 6 and mean/beta scaled by 2 keeps unit 6 = 2 x unit 0
    gamma, beta, mean, var = np.ones(8), normal(8), normal(8), np.ones(8)
    beta[6], mean[6] = 2 * beta[0], 2 * mean[0]
    h = g.op("Relu", [g.bn(g.conv(r, w1, b1, name="conv1", pads=[1, 1, 1, 1]), gamma, beta, mean, var)])
    w2, b2 = normal(8, 8, 3, 3), normal(8)
    w2[5], b2[5] = 2 * w2[1], 2 * b2[1]
    s = g.op("Relu", [g.op("Add", [r, g.conv(h, w2, b2, name="conv2", pads=[1, 1, 1, 1])])])
    c = g.op("Relu", [g.conv(s, normal(6, 8, 1, 1), 1 + normal(6), name="conv_out")])  # bias > 0: no dead units
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    return g.build(g.gemm(f, normal(6, 3), normal(3), name="fc"), ["N", 3])


def test_planted_duplicate_in_a_residual_stream_and_block():
    model = residual_model()
    x = RNG.normal(size=(128, 3, 8, 8)).astype(np.float32)
    _, report, error = prune_and_compare(model, x, tolerance=1e-5)
    stream = next(r for r in report.spaces if "conv_a" in r.producers)
    assert set(stream.producers) == {"conv_a", "conv2"}, "the residual Add couples both producers"
    assert (stream.kept, stream.units) == (7, 8)
    assert kept(report, "conv1") == (7, 8)
    assert kept(report, "conv_out") == (6, 6)
    assert error < 1e-4


def inverted_residual_model():
    """stem -> [expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1] + skip.
    Expanded unit 9 is an exact copy of unit 2 (through the depthwise conv and both BNs)."""
    g = GraphBuilder([1, 3, 8, 8])
    stem = g.op("Relu", [g.conv("x", normal(4, 3, 3, 3), normal(4), name="stem", pads=[1, 1, 1, 1])])
    we, be = normal(12, 4, 1, 1), normal(12)
    we[9], be[9] = we[2], be[2]
    # beta around 2 keeps ReLU6 in its linear range most of the time: no unplanned constant units
    gamma, beta, mean, var = 1 + normal(12, scale=0.1), 2 + normal(12, scale=0.2), normal(12), 1 + np.abs(normal(12))
    for p in (gamma, beta, mean, var):
        p[9] = p[2]
    six = g.const(np.float32(6.0), "six"), g.const(np.float32(0.0), "zero")
    e = g.op("Clip", [g.bn(g.conv(stem, we, be, name="expand"), gamma, beta, mean, var), six[1], six[0]])
    wd, bd = normal(12, 1, 3, 3), normal(12)
    wd[9], bd[9] = wd[2], bd[2]
    d = g.op("Clip", [g.bn(g.conv(e, wd, bd, name="dw", group=12, pads=[1, 1, 1, 1]), gamma, beta, mean, var), six[1], six[0]])
    p = g.conv(d, normal(4, 12, 1, 1), normal(4), name="project")
    out = g.op("Add", [stem, p])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [out])])])
    return g.build(g.gemm(f, normal(4, 5), normal(5), name="fc"), ["N", 5])


def test_planted_duplicate_in_an_inverted_residual_block():
    model = inverted_residual_model()
    x = RNG.normal(size=(128, 3, 8, 8)).astype(np.float32)
    pruned, report, error = prune_and_compare(model, x, tolerance=1e-5)
    assert kept(report, "expand") == (11, 12)
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 11
    stream = next(r for r in report.spaces if "stem" in r.producers)
    assert set(stream.producers) == {"stem", "project"} and stream.kept == stream.units
    assert error < 1e-4


def concat_model():
    """Two branches concatenated, then BN -> ReLU -> 1x1 conv: the consumer maps onto two spaces."""
    g = GraphBuilder([1, 3, 6, 6])
    wa, ba = normal(6, 3, 3, 3), normal(6)
    wa[4], ba[4] = 2 * wa[1], 2 * ba[1]
    wb, bb = normal(5, 3, 1, 1), normal(5)
    wb[3], bb[3] = wb[0], bb[0]
    a = g.op("Relu", [g.conv("x", wa, ba, name="branch_a", pads=[1, 1, 1, 1])])
    b = g.op("Relu", [g.conv("x", wb, bb, name="branch_b")])
    cat = g.op("Concat", [a, b], axis=1)
    # identity-like BN on the concatenation keeps the planted relations (scale 1, no shift)
    y = g.op("Relu", [g.bn(cat, np.ones(11), np.zeros(11), np.zeros(11), np.ones(11) - 1e-5)])
    c = g.op("Relu", [g.conv(y, normal(4, 11, 1, 1), normal(4), name="mix")])
    return g.build(g.gemm(g.op("Flatten", [c]), normal(4 * 36, 3), normal(3), name="fc"), ["N", 3])


def test_planted_duplicates_across_a_concat():
    model = concat_model()
    x = RNG.normal(size=(64, 3, 6, 6)).astype(np.float32)
    pruned, report, error = prune_and_compare(model, x, tolerance=1e-5)
    assert kept(report, "branch_a") == (5, 6)
    assert kept(report, "branch_b") == (4, 5)
    mix = next(n for n in pruned.graph.node if n.name == "mix")
    weight = next(t for t in pruned.graph.initializer if t.name == mix.input[1])
    assert list(weight.dims) == [4, 9, 1, 1]
    assert error < 1e-4


def test_concat_at_ratio_keeps_bn_and_consumer_consistent():
    model = concat_model()
    x = RNG.normal(size=(64, 3, 6, 6)).astype(np.float32)
    _, report, error = prune_and_compare(model, x, ratio=0.5)
    assert report.units_after < report.units_before
    assert error < 1.0


def unsupported_op_model():
    """conv_a -> Relu -> conv_b -> Softmax over channels -> conv_c: Softmax mixes conv_b's units."""
    g = GraphBuilder([1, 3, 6, 6])
    a = g.op("Relu", [g.conv("x", normal(6, 3, 3, 3), normal(6), name="conv_a", pads=[1, 1, 1, 1])])
    b = g.op("Softmax", [g.conv(a, normal(6, 6, 3, 3), normal(6), name="conv_b", pads=[1, 1, 1, 1])], axis=1)
    c = g.op("Relu", [g.conv(b, normal(4, 6, 1, 1), normal(4), name="conv_c")])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    return g.build(g.gemm(f, normal(4, 2), normal(2), name="fc"), ["N", 2])


def test_unsupported_op_pins_only_its_space():
    model = unsupported_op_model()
    x = RNG.normal(size=(64, 3, 6, 6)).astype(np.float32)
    pruned, report, _ = prune_and_compare(model, x, ratio=0.3)
    row_b = next(r for r in report.spaces if r.name == "conv_b")
    assert row_b.pinned and "Softmax" in row_b.pinned[0]
    assert row_b.kept == row_b.units
    assert kept(report, "conv_a")[0] < 6 or kept(report, "conv_c")[0] < 4
    assert report.macs_after < report.macs_before


def test_model_with_nothing_prunable_gives_a_clear_error():
    g = GraphBuilder([1, 3, 6, 6])
    model = g.build(g.conv("x", normal(4, 3, 3, 3), normal(4), name="only"), ["N", 4, 4, 4])
    with pytest.raises(onnxprune.ModelError, match="nothing to prune.*graph output"):
        onnxprune.prune(model, {"x": RNG.normal(size=(8, 3, 6, 6)).astype(np.float32)}, ratio=0.3)
