"""NHWC graphs (issue 14), built the way tf2onnx emits Keras models: convs wrapped in
Transpose pairs (NHWC -> NCHW -> Conv -> NHWC), BatchNorm as Mul/Add on the last axis, Dense
on channel-last tensors (MatMul on [N, H, W, C], and Tensordot's Reshape [-1, C] -> MatMul ->
Reshape with int32 shapes computed from Shape)."""

from __future__ import annotations

import numpy as np
import onnx

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.graph import GraphIndex, static_shapes

RNG = np.random.default_rng(31)
NCHW, NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def nhwc_conv(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
    """tf2onnx's Conv2D: Transpose to NCHW, Conv, Transpose back."""
    y = g.conv(g.op("Transpose", [x], perm=NCHW), w, b, name=name, pads=[1, 1, 1, 1])
    return g.op("Transpose", [y], perm=NHWC)


def nhwc_cnn(plant: bool = True) -> onnx.ModelProto:
    """stem conv -> BN as Mul/Add on the last axis -> ReLU -> conv c1 -> ReLU -> Mul/Add ->
    channel-last Dense (MatMul on [N, H, W, C]) -> ReLU -> mean over H, W -> Dense. With
    `plant`, c1's unit 5 is a copy of its unit 2 (weights, bias and the BN scale/shift)."""
    g = GraphBuilder([1, 8, 8, 3])
    h = nhwc_conv(g, "x", normal(6, 3, 3, 3), normal(6), "stem")
    h = g.op("Relu", [g.op("Add", [g.op("Mul", [h, g.const(RNG.uniform(0.5, 1.5, 6))]), g.const(normal(6))])])
    w, b, scale, shift = normal(8, 6, 3, 3), normal(8), RNG.uniform(0.5, 1.5, 8).astype(np.float32), normal(8)
    if plant:
        w[5], b[5], scale[5], shift[5] = w[2], b[2], scale[2], shift[2]
    h = g.op("Relu", [nhwc_conv(g, h, w, b, "c1")])
    h = g.op("Add", [g.op("Mul", [h, g.const(scale)], name="bn_mul"), g.const(shift)], name="bn_add")
    h = g.op("Relu", [g.matmul(h, normal(8, 6), normal(6), name="dense_hwc")])
    pooled = g.op("ReduceMean", [h], axes=[1, 2], keepdims=0)
    return g.build(g.matmul(pooled, normal(6, 3), normal(3), name="head"), ["N", 3])


def tensordot(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, name: str) -> str:
    """tf2onnx's Dense on [N, T, C] (no optimiser): Reshape to [N*T, C] with int32 sizes read
    from Shape, MatMul, Reshape back to [N, T, F], bias Add."""
    i32 = onnx.TensorProto.INT32
    shape = g.op("Cast", [g.op("Shape", [x])], to=i32)
    free = g.op("Gather", [shape, g.const(np.array([0, 1]), dtype=np.int32)], axis=0)
    axes = g.op("Gather", [shape, g.const(np.array([2]), dtype=np.int32)], axis=0)
    rows = g.op("Unsqueeze", [g.op("ReduceProd", [free], axes=[0], keepdims=0), g.const(np.array([0]), dtype=np.int64)])
    cols = g.op("Unsqueeze", [g.op("ReduceProd", [axes], axes=[0], keepdims=0), g.const(np.array([0]), dtype=np.int64)])
    flat = g.op("Reshape", [x, g.op("Cast", [g.op("Concat", [rows, cols], axis=0)], to=onnx.TensorProto.INT64)])
    out = g.op("MatMul", [flat, g.const(w)], name=name)
    back = g.op("Cast", [g.op("Concat", [free, g.const(np.array([w.shape[1]]), dtype=np.int32)], axis=0)], to=onnx.TensorProto.INT64)
    return g.op("Add", [g.op("Reshape", [out, back]), g.const(b)])


def channel_last_mlp(plant: bool = True) -> onnx.ModelProto:
    """Dense(12) -> ReLU -> Dense(5) on [N, T, 6] tokens, both as tf2onnx's Tensordot; with
    `plant`, neuron 9 of the first Dense is a copy of neuron 4."""
    g = GraphBuilder([1, 4, 6])
    w1, b1 = normal(6, 12), normal(12)
    if plant:
        w1[:, 9], b1[9] = w1[:, 4], b1[4]
    h = g.op("Relu", [tensordot(g, "x", w1, b1, "fc1")])
    return g.build(tensordot(g, h, normal(12, 5), normal(5), "fc2"), ["N", 4, 5])


def spaces_of(model: onnx.ModelProto, shape: tuple[int, ...]):
    return analyse(model, index=GraphIndex(model, static_shapes(model, {"x": shape}))).spaces


def test_transpose_wrapped_convs_and_last_axis_batchnorm_carry_the_units():
    space = next(s for s in spaces_of(nhwc_cnn(), (1, 8, 8, 3)) if s.name == "c1")
    assert not space.pinned, space.pinned
    assert {"bn_mul", "bn_add"} <= set(space.pass_through)
    assert [c.node for c in space.consumers] == ["dense_hwc"]
    assert space.tensors["bn_add_out"].axis == 3, "the units sit on the last axis of the NHWC tensor"


def test_a_planted_duplicate_nhwc_conv_channel_is_removed_exactly():
    model = nhwc_cnn()
    x = RNG.normal(size=(64, 8, 8, 3)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "c1")
    assert (row.kept, row.units) == (7, 8)
    assert initializer(pruned, "c1", 1).shape[0] == 7
    assert initializer(pruned, "dense_hwc", 1).shape[0] == 7
    fresh = RNG.normal(size=(5, 8, 8, 3)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def test_tensordot_with_int32_computed_shapes_prunes_a_planted_duplicate_neuron():
    model = channel_last_mlp()
    space = next(s for s in spaces_of(model, (1, 4, 6)) if s.name == "fc1")
    assert not space.pinned, space.pinned
    assert {u.dtype for u in space.reshapes} == {"int32"}
    x = RNG.normal(size=(64, 4, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "fc1")
    assert (row.kept, row.units) == (11, 12)
    fresh = RNG.normal(size=(3, 4, 6)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4
