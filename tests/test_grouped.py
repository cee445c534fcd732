"""Grouped (non-depthwise) convolutions (issue 14) and ConvTransposes (session 21): a unit is a
whole group, carried from the group's input channels to its output channels; the weight loses
the group's rows and `group` counts the kept groups. A planted duplicate group is removed
without changing the output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse

RNG = np.random.default_rng(5)
GROUPS, PER_IN, PER_OUT = 4, 3, 2


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def bn_params(n: int):
    return [1 + normal(n, scale=0.1), 0.5 + normal(n, scale=0.1), normal(n, scale=0.1), 1 + np.abs(normal(n, scale=0.1))]


def copy_group(arrays, per: int, source: int, target: int) -> None:
    for a in arrays:
        a[target * per:(target + 1) * per] = a[source * per:(source + 1) * per]


def resnext_block(duplicate: bool = True) -> onnx.ModelProto:
    """conv1 -> BN -> ReLU -> grouped 3x3 conv (4 groups, 3 -> 2 channels each) -> BN -> ReLU ->
    conv3 -> GAP -> Gemm. With `duplicate`, group 3 is an exact copy of group 1 on both sides."""
    g = GraphBuilder([1, 3, 8, 8])
    w1, b1, bn1 = normal(GROUPS * PER_IN, 3, 1, 1), normal(GROUPS * PER_IN), bn_params(GROUPS * PER_IN)
    wg, bg, bn2 = normal(GROUPS * PER_OUT, PER_IN, 3, 3), normal(GROUPS * PER_OUT), bn_params(GROUPS * PER_OUT)
    if duplicate:
        copy_group([w1, b1, *bn1], PER_IN, 1, 3)
        copy_group([wg, bg, *bn2], PER_OUT, 1, 3)
    h = g.op("Relu", [g.bn(g.conv("x", w1, b1, name="conv1"), *bn1)])
    h = g.op("Relu", [g.bn(g.conv(h, wg, bg, name="grouped", group=GROUPS, pads=[1, 1, 1, 1]), *bn2)])
    c = g.op("Relu", [g.conv(h, normal(5, GROUPS * PER_OUT, 1, 1), 1 + normal(5), name="conv3")])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    return g.build(g.gemm(f, normal(5, 3), normal(3), name="fc"), ["N", 3])


def test_a_grouped_conv_joins_its_input_and_output_channels_in_whole_groups():
    space = next(s for s in analyse(resnext_block()).spaces if s.name == "conv1")
    assert not space.pinned and space.n == GROUPS
    grouped = next(n for n in resnext_block().graph.node if n.name == "grouped")
    assert (space.tensors[grouped.input[0]].block, space.tensors[grouped.output[0]].block) == (PER_IN, PER_OUT)
    assert [c.node for c in space.consumers] == ["conv3"]


def test_a_planted_duplicate_group_is_removed_exactly():
    model = resnext_block()
    x = RNG.normal(size=(128, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "conv1")
    assert (row.kept, row.units) == (GROUPS - 1, GROUPS)
    grouped = next(n for n in pruned.graph.node if n.name == "grouped")
    assert onnx.helper.get_attribute_value(next(a for a in grouped.attribute if a.name == "group")) == GROUPS - 1
    assert initializer(pruned, "grouped", 1).shape == ((GROUPS - 1) * PER_OUT, PER_IN, 3, 3)
    assert initializer(pruned, "conv1", 1).shape[0] == (GROUPS - 1) * PER_IN
    fresh = RNG.normal(size=(8, 3, 8, 8)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def residual_into_grouped() -> onnx.ModelProto:
    """skip = conv_b(x), listed first, is added to the grouped conv's output: its space reaches
    the grouped conv from the output side and must regrow in whole groups."""
    g = GraphBuilder([1, 3, 6, 6])
    skip = g.conv("x", normal(GROUPS * PER_OUT, 3, 1, 1), normal(GROUPS * PER_OUT), name="conv_b")
    h = g.op("Relu", [g.conv("x", normal(GROUPS * PER_IN, 3, 3, 3), normal(GROUPS * PER_IN), name="conv_a", pads=[1, 1, 1, 1])])
    y = g.op("Relu", [g.op("Add", [g.conv(h, normal(GROUPS * PER_OUT, PER_IN, 3, 3), normal(GROUPS * PER_OUT), name="grouped",
                                          group=GROUPS, pads=[1, 1, 1, 1]), skip])])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [g.conv(y, normal(4, GROUPS * PER_OUT, 1, 1), normal(4), name="conv3")])])])
    return g.build(g.gemm(f, normal(4, 2), normal(2), name="fc"), ["N", 2])


def test_a_grouped_conv_reached_from_its_output_couples_the_residual_in_groups():
    model = residual_into_grouped()
    space = next(s for s in analyse(model).spaces if s.name == "conv_b")
    assert not space.pinned and space.n == GROUPS and set(space.producers) == {"conv_b", "conv_a"}
    x = RNG.normal(size=(64, 3, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.5)
    grouped = next(n for n in pruned.graph.node if n.name == "grouped")
    kept = onnx.helper.get_attribute_value(next(a for a in grouped.attribute if a.name == "group"))
    assert kept < GROUPS and initializer(pruned, "grouped", 1).shape == (kept * PER_OUT, PER_IN, 3, 3)
    assert initializer(pruned, "conv_b", 1).shape[0] == kept * PER_OUT
    assert run(pruned, x[:4]).shape == (4, 2)


def test_whole_groups_are_not_attention_heads_for_the_head_gain():
    """--head-gain (default 4) protects attention heads and KV groups, not a grouped Conv's groups
    (units of several channels too)."""
    from onnxprune.allocate import attention_spaces
    from onnxprune.graph import GraphIndex

    model = resnext_block()
    analysis = analyse(model)
    assert any(s.name == "conv1" and not s.pinned for s in analysis.spaces)
    assert attention_spaces(analysis, GraphIndex(model)) == []
    from onnxprune.preparation import prepare

    bert = prepare("models/transformers/bert_tiny.dynamo.onnx", "models/transformers/calib_tokens.npz")
    heads = attention_spaces(bert.analysis, bert.index)
    assert len(heads) == 2 and all(bert.analysis.spaces[i].n == 4 for i in heads)  # 4 heads in each of 2 layers


@pytest.mark.parametrize("opset", [21])  # the opset-18 op (scale per group) is deprecated: onnx's checker refuses it
def test_group_normalization_prunes_whole_groups_and_a_copied_group_goes_exactly(opset: int) -> None:
    """GroupNormalization (4 groups of 2 channels) normalises each group on its own: the units
    become groups, num_groups and scale/bias (per channel) follow, and group 3, a copy of group
    1 (filters, scale, bias), is removed exactly."""
    rng = np.random.default_rng(8)
    w, b = normal(8, 3, 3, 3), normal(8)
    w[6:8], b[6:8] = w[2:4], b[2:4]
    per = 1 if opset == 18 else 2
    scale, shift = rng.uniform(0.5, 1.5, 4 * per).astype(np.float32), normal(4 * per)
    scale[3 * per:], shift[3 * per:] = scale[per:2 * per], shift[per:2 * per]
    g = GraphBuilder([None, 3, 6, 6], opset=opset)
    h = g.conv("x", w, b, name="conv", pads=[1, 1, 1, 1])
    h = g.op("Relu", [g.op("GroupNormalization", [h, g.const(scale), g.const(shift)], name="gn", num_groups=4, epsilon=1e-5)])
    model = g.build(g.conv(h, normal(5, 8, 1, 1), normal(5), name="head"), ["N", 5, 6, 6])
    space = next(s for s in onnxprune.inspect_model(model).spaces if s.name == "conv")
    assert space.units == 4 and not space.pinned, space
    x = rng.normal(size=(48, 3, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert next(s for s in report.spaces if s.name == "conv").kept == 3
    node = next(n for n in pruned.graph.node if n.op_type == "GroupNormalization")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_groups")) == 3
    assert relative_l2(run(model, x[:4]), run(pruned, x[:4])) < 1e-4


def test_a_grouped_conv_whose_output_no_space_carries_is_listed_with_the_reason():
    """ShuffleNet v1's grouped 1x1 convs read channels from a stem no group-wise unit can follow:
    their outputs start no space, and the report lists them as pinned spaces with the reason
    (they were left out of the analysis without a word); a grouped conv carried in whole groups
    (ResNeXt) is part of its input's space, not listed apart."""
    g = GraphBuilder([1, 3, 8, 8])
    stem = g.op("Relu", [g.conv("x", normal(6, 3, 3, 3), normal(6), name="stem", pads=[1, 1, 1, 1])])
    a = g.op("Relu", [g.conv(stem, normal(8, 3, 1, 1), normal(8), name="gconv_a", group=2)])
    b = g.op("Relu", [g.conv(stem, normal(8, 2, 1, 1), normal(8), name="gconv_b", group=3)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Concat", [a, b], axis=1)])])
    model = g.build(g.gemm(f, normal(16, 3), normal(3), name="fc"), ["N", 3])
    spaces = {s.name: s for s in analyse(model).spaces}
    assert "grouped Conv 'gconv_b' (group=3) starts no space" in spaces["gconv_b"].pinned[0]
    assert "gconv_a" not in spaces and a in spaces["stem"].tensors  # carried in whole groups from the stem
    assert "grouped" not in {s.name for s in analyse(resnext_block()).spaces}


def test_a_depthwise_conv_transpose_carries_the_units_and_a_copy_goes_exactly() -> None:
    """conv (8 units, unit 7 a copy of unit 3) -> depthwise ConvTranspose k4 s2 p1 (a learned
    per-channel upsampling, its weight [8, 1, 4, 4] copied alike) -> conv: the units pass
    through the ConvTranspose (weight and bias sliced, group updated), as through a depthwise Conv."""
    g = GraphBuilder([None, 3, 5, 5])
    w, b = normal(8, 3, 3, 3), normal(8)
    w[7], b[7] = w[3], b[3]
    h = g.op("Relu", [g.conv("x", w, b, name="expand", pads=[1, 1, 1, 1])])
    up_w, up_b = normal(8, 1, 4, 4), normal(8)
    up_w[7], up_b[7] = up_w[3], up_b[3]
    up = g.op("ConvTranspose", [h, g.const(up_w), g.const(up_b)], name="up", group=8, kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
    model = g.build(g.conv(g.op("Relu", [up]), normal(4, 8, 1, 1), normal(4)), ["N", 4, 10, 10])
    x = RNG.normal(size=(48, 3, 5, 5)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    expand = next(s for s in report.spaces if s.name == "expand")
    assert not expand.pinned and expand.kept <= 7, expand
    node = next(n for n in pruned.graph.node if n.name == "up")
    assert next(a.i for a in node.attribute if a.name == "group") == expand.kept
    fresh = RNG.normal(size=(3, 3, 5, 5)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5


def test_a_grouped_conv_transpose_loses_a_copied_group_exactly() -> None:
    """conv (G x 3 channels) -> ReLU -> grouped ConvTranspose k4 s2 p1 (weight [G x 3, 2, 4, 4])
    -> ReLU -> conv: group 3 is a copy of group 1 (conv rows, deconvolution rows and bias), so
    the whole group goes: the ConvTranspose's input rows, its output channels and `group`."""
    w, b = normal(GROUPS * PER_IN, 3, 3, 3), normal(GROUPS * PER_IN)
    up_w, up_b = normal(GROUPS * PER_IN, PER_OUT, 4, 4), normal(GROUPS * PER_OUT)
    for array, per in ((w, PER_IN), (b, PER_IN), (up_w, PER_IN), (up_b, PER_OUT)):
        array[3 * per:4 * per] = array[per:2 * per]
    g = GraphBuilder([None, 3, 5, 5])
    h = g.op("Relu", [g.conv("x", w, b, name="expand", pads=[1, 1, 1, 1])])
    up = g.op("ConvTranspose", [h, g.const(up_w), g.const(up_b)], name="up", group=GROUPS, kernel_shape=[4, 4], strides=[2, 2],
              pads=[1, 1, 1, 1])
    model = g.build(g.conv(g.op("Relu", [up]), normal(3, GROUPS * PER_OUT, 1, 1), normal(3), name="head"), ["N", 3, 10, 10])
    space = next(s for s in analyse(model).spaces if s.name == "expand")
    assert not space.pinned and space.n == GROUPS, space.pinned
    x = RNG.normal(size=(48, 3, 5, 5)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    assert next(r for r in report.spaces if r.name == "expand").kept == GROUPS - 1
    node = next(n for n in pruned.graph.node if n.name == "up")
    assert next(a.i for a in node.attribute if a.name == "group") == GROUPS - 1
    assert initializer(pruned, "up", 1).shape == ((GROUPS - 1) * PER_IN, PER_OUT, 4, 4)
    assert initializer(pruned, "head", 1).shape[1] == (GROUPS - 1) * PER_OUT
    fresh = RNG.normal(size=(4, 3, 5, 5)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5


def test_a_grouped_conv_transpose_whose_output_no_space_carries_is_listed_with_the_reason() -> None:
    """A grouped ConvTranspose reading the graph input starts no space (its output channels come
    in groups with input channels no space owns): the report lists it, with C_out = G x weight dim 1."""
    g = GraphBuilder([None, 4, 5, 5])
    up = g.op("ConvTranspose", ["x", g.const(normal(4, 3, 2, 2))], name="up", group=2, kernel_shape=[2, 2], strides=[2, 2])
    model = g.build(g.conv(g.op("Relu", [up]), normal(3, 6, 1, 1), normal(3), name="head"), ["N", 3, 10, 10])
    space = next(s for s in analyse(model).spaces if s.name == "up")
    assert space.n == 6 and space.pinned == ["grouped ConvTranspose 'up' (group=2) starts no space: a unit would be a whole group with its "
                                             "input channels"]
