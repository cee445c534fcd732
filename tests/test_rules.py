"""The op-rule registry (issue 14): rules are pure functions of (index, node, tensor, placement)
returning effects, every op table is covered, and a new rule plugs into the engine."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import GraphBuilder
from onnxprune.analyse import analyse
from onnxprune.graph import GraphIndex
from onnxprune.ops import BROADCAST_ELEMENTWISE, CHANNEL_PARAM_OPS, CHANNEL_WISE, REDUCE_OPS, UNARY_PASS_THROUGH
from onnxprune.placement import Placement
from onnxprune.rules import CARRY, CONSUME, PRODUCE, Carry, Pin, Through
from onnxprune.rules.registry import carries
from onnxprune.spaces import Consumer, ParamSlice

RNG = np.random.default_rng(3)


def normal(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def conv_mul_conv(op: str = "Mul"):
    """conv_a -> x per-channel constant -> conv_b -> GAP -> Flatten -> Gemm."""
    g = GraphBuilder([1, 3, 6, 6])
    a = g.conv("x", normal(4, 3, 3, 3), normal(4), name="conv_a", pads=[1, 1, 1, 1])
    m = g.op(op, [a, g.const(normal(1, 4, 1, 1))], name="scale")
    b = g.conv(m, normal(5, 4, 1, 1), normal(5), name="conv_b")
    f = g.op("Flatten", [g.op("GlobalAveragePool", [b])])
    return g.build(g.gemm(f, normal(5, 2), normal(2), name="fc"), ["N", 2])


def test_every_op_table_has_a_rule():
    for op in UNARY_PASS_THROUGH | CHANNEL_WISE | set(CHANNEL_PARAM_OPS) | BROADCAST_ELEMENTWISE | REDUCE_OPS:
        assert op in CARRY, op
    for op in ("Concat", "Split", "Slice", "Pad", "Resize", "Reshape", "Flatten", "Transpose", "Unsqueeze", "Squeeze",
               "Expand", "MatMul", "Softmax", "Shape", "Conv", "LayerNormalization", "Attention", "Gather", "GatherND"):
        assert op in CARRY, op
    assert set(PRODUCE) == {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "Flatten", "Reshape", "LSTM", "GRU", "RNN"} <= set(CONSUME)


def test_a_broadcast_rule_returns_the_slice_and_the_carried_tensors():
    model = conv_mul_conv()
    index = GraphIndex(model)
    node = index.node("scale")
    placement = Placement.identity(1, 4)
    effects = CARRY["Mul"](index, node, node.input[0], placement)
    assert effects == [ParamSlice("scale", 1, 1, node.output[0]), Through("scale"), Carry(node.input[0], placement), Carry(node.output[0], placement)]


def test_a_consumer_rule_reads_the_units_and_a_carry_rule_pins_with_a_reason():
    index = GraphIndex(conv_mul_conv())
    conv_b = index.node("conv_b")
    effects = CONSUME["Conv"](index, conv_b, 0, conv_b.input[0], Placement.identity(1, 4))
    assert effects == [Consumer("conv_b", "Conv", 1, 1, 0, conv_b.input[0])]
    assert CONSUME["Conv"](index, conv_b, 0, conv_b.input[0], Placement.identity(1, 3))[0].reason.startswith("Conv 'conv_b' weight has 4")
    scale = index.node("scale")
    pin = CARRY["Mul"](index, scale, scale.input[0], Placement.identity(1, 3))
    assert pin == [Pin(f"Mul 'scale' input '{scale.input[1]}' does not broadcast over 3 elements")]


def test_gather_nd_moves_the_units_past_the_indices_leading_axes_both_ways():
    """GatherND of a [positions, heads] table by ids [T, T, 1]: heads on data axis 1 are output
    axis 2, reached from either side; the ids are never the units' tensor."""
    g = GraphBuilder([1, 4])
    table = g.op("Relu", ["x"])
    picked = g.op("GatherND", [table, g.const(np.zeros((3, 3, 1)), dtype=np.int64)], name="lookup")
    index = GraphIndex(g.build(picked, [3, 3, 4]))
    node, heads = index.node("lookup"), Placement.identity(1, 2, 2)
    forward = CARRY["GatherND"](index, node, table, heads)
    assert forward == [Through("lookup"), Carry(table, heads), Carry(picked, heads.moved(2))]
    assert CARRY["GatherND"](index, node, picked, heads.moved(2)) == forward
    assert CARRY["GatherND"](index, node, picked, heads.moved(1))[0].reason == "GatherND 'lookup' indexes the units' axis"
    assert isinstance(CARRY["GatherND"](index, node, node.input[1], heads)[0], Pin)


def test_registering_an_op_twice_is_refused():
    with pytest.raises(ValueError, match="already has a rule"):
        carries("Relu")(lambda index, node, tensor, placement: [])


def test_an_unknown_op_pins_and_a_new_rule_makes_it_prunable():
    """Adding an op is one rule: a made-up per-channel op pins until it is registered."""
    model = conv_mul_conv("Mul")
    model.graph.node[1].op_type = "ChannelGain"  # not an ONNX op: onnxprune's analysis only reads the graph
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(model.graph.node[1].output[0], onnx.TensorProto.FLOAT, ["N", 4, 6, 6]))
    space = analyse(model).spaces[0]
    assert space.pinned == ["ChannelGain 'scale' on the unit axis is not supported"]
    try:
        CARRY["ChannelGain"] = CARRY["Mul"]
        space = analyse(model).spaces[0]
        assert not space.pinned and space.producers == ["conv_a"] and [c.node for c in space.consumers] == ["conv_b"]
        assert any(s.node == "scale" for s in space.slices)
    finally:
        del CARRY["ChannelGain"]
