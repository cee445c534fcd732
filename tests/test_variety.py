"""Issue 7: model variety (fp16, opsets 11..21, several inputs and outputs, dynamic batch) and
determinism (same inputs and options -> byte-identical output)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import GraphBuilder, relative_l2, run
from onnxprune.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"
RNG = np.random.default_rng(3)


def normal(*shape):
    return (RNG.normal(size=shape) * 0.5).astype(np.float32)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with every float tensor in float16."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for i, tensor in enumerate(half.graph.initializer):
        value = numpy_helper.to_array(tensor)
        if value.dtype == np.float32:
            half.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float16), tensor.name))
    for node in half.graph.node:
        for attr in node.attribute:
            if attr.HasField("t") and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    return half


@pytest.mark.parametrize("name,calib", [("mlp.ts", "fmnist_calib_flat"), ("vgg_bn.ts", "fmnist_calib")])
def test_fp16_models_keep_fp16_weights(name, calib):
    half = to_fp16(onnx.load(MODELS / f"{name}.onnx"))
    onnx.checker.check_model(half, full_check=True)
    model, report = onnxprune.prune(half, MODELS / "data" / f"{calib}.npz", ratio=0.3)
    onnx.checker.check_model(model, full_check=True)
    float_types = {t.data_type for t in model.graph.initializer} - {TensorProto.INT64}
    assert float_types == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert any("cast from float32 to the model's float16" in w for w in report.warnings)
    assert report.fidelity[0].top1_agreement > 0.8
    assert report.macs_after < report.macs_before


def opset_model(opset: int) -> onnx.ModelProto:
    """Conv-BN-ReLU6-MaxPool, a channel Split (attribute, input or num_outputs by opset) into two
    convs, Concat, ReduceMean over space (axes attribute or input by opset), Gemm."""
    g = GraphBuilder([1, 3, 8, 8], opset=opset)
    c = g.bn(g.conv("x", normal(8, 3, 3, 3), normal(8), name="stem", pads=[1, 1, 1, 1]), np.ones(8), normal(8), normal(8), np.ones(8))
    c = g.op("MaxPool", [g.op("Clip", [c, g.const(np.float32(0)), g.const(np.float32(6))])], kernel_shape=[2, 2], strides=[2, 2])
    outs = ["part_a", "part_b"]
    if opset < 13:
        g.nodes.append(helper.make_node("Split", [c], outs, axis=1, split=[3, 5], name="split"))
    elif opset < 18:
        g.nodes.append(helper.make_node("Split", [c, g.const(np.array([3, 5]), dtype=np.int64)], outs, axis=1, name="split"))
    else:
        g.nodes.append(helper.make_node("Split", [c], ["part_a", "part_b"], axis=1, num_outputs=2, name="split"))
    widths = (3, 5) if opset < 18 else (4, 4)
    a = g.op("Relu", [g.conv("part_a", normal(4, widths[0], 1, 1), normal(4), name="conv_a")])
    b = g.op("Relu", [g.conv("part_b", normal(4, widths[1], 1, 1), normal(4), name="conv_b")])
    cat = g.op("Concat", [a, b], axis=1)
    if opset < 18:
        pooled = g.op("ReduceMean", [cat], axes=[2, 3], keepdims=0)
    else:
        pooled = g.op("ReduceMean", [cat, g.const(np.array([2, 3]), dtype=np.int64)], keepdims=0)
    model = g.build(g.gemm(pooled, normal(8, 3), normal(3), name="fc"), ["N", 3])
    model.ir_version = {11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}[opset]
    return model


@pytest.mark.parametrize("opset", list(range(11, 22)))
def test_opsets_11_to_21(opset):
    model = opset_model(opset)
    onnx.checker.check_model(model, full_check=True)
    x = RNG.normal(size=(64, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.4)
    assert pruned.opset_import[0].version == opset and pruned.ir_version == model.ir_version
    onnx.checker.check_model(pruned, full_check=True)
    assert report.units_after < report.units_before
    fresh = RNG.normal(size=(3, 3, 8, 8)).astype(np.float32)
    assert run(pruned, fresh).shape == (3, 3)
    same, _ = onnxprune.prune(model, {"x": x}, ratio=0.0)
    assert np.array_equal(run(model, fresh), run(same, fresh))


def two_input_two_output_model() -> onnx.ModelProto:
    """An image branch and a vector branch joined by Add, with logits and an auxiliary output."""
    img = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 6, 6])
    vec = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 5])
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(value, name))
        return name

    nodes += [
        helper.make_node("Conv", ["image", const("wc", normal(6, 3, 3, 3)), const("bc", normal(6))], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", const("w1", normal(6, 8)), const("b1", normal(8))], ["h1"], name="fc_img"),
        helper.make_node("Gemm", ["features", const("w2", normal(5, 8)), const("b2", normal(8))], ["h2"], name="fc_vec"),
        helper.make_node("Add", ["h1", "h2"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", const("w3", normal(8, 4)), const("b3", normal(4))], ["logits"], name="head"),
        helper.make_node("Gemm", ["hr", const("w4", normal(8, 2)), const("b4", normal(2))], ["aux"], name="aux_head"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
               helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 2])]
    graph = helper.make_graph(nodes, "two", [img, vec], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_several_inputs_and_outputs(tmp_path):
    model = two_input_two_output_model()
    calib = {"image": RNG.normal(size=(80, 3, 6, 6)).astype(np.float32), "features": RNG.normal(size=(80, 5)).astype(np.float32)}
    pruned, report = onnxprune.prune(model, calib, ratio=0.3)
    onnx.checker.check_model(pruned, full_check=True)
    stream = next(r for r in report.spaces if "fc_img" in r.producers)
    assert set(stream.producers) == {"fc_img", "fc_vec"}, "Add couples both branches"
    assert {f.name for f in report.fidelity} == {"logits", "aux"}
    assert [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    fresh = {"image": calib["image"][:7], "features": calib["features"][:7]}
    logits, aux = session.run(None, fresh)
    assert logits.shape == (7, 4) and aux.shape == (7, 2)
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, fresh)
    assert relative_l2(reference[0], logits) < 1.0


def test_same_inputs_give_byte_identical_output(tmp_path):
    outputs = []
    for i in range(2):
        out = tmp_path / f"out{i}.onnx"
        args = [str(MODELS / "vgg_bn.ts.onnx"), "--calib", str(MODELS / "data" / "fmnist_calib.npz"), "-o", str(out), "--ratio", "0.4", "-q"]
        assert main(args) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    for method in ("random", "fluct"):
        a, _ = onnxprune.prune(MODELS / "mlp.ts.onnx", MODELS / "data" / "fmnist_calib_flat.npz", ratio=0.3, method=method, seed=5)
        b, _ = onnxprune.prune(MODELS / "mlp.ts.onnx", MODELS / "data" / "fmnist_calib_flat.npz", ratio=0.3, method=method, seed=5)
        assert a.SerializeToString() == b.SerializeToString()


def assert_both_layers_prune_on_their_own(model: onnx.ModelProto, rng: np.random.Generator) -> None:
    """'layer1' and 'layer2' (64 inputs, 72 outputs, output 7 of layer1 a copy of output 2) are
    prunable spaces; the copy goes exactly, and the caller's model is left as it was."""
    from builders import relative_l2, run

    before = model.SerializeToString()
    found = {s.name: s for s in onnxprune.inspect_model(model).spaces}
    assert not found["layer1"].pinned and not found["layer2"].pinned, found
    x = rng.normal(size=(400, 64)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert {s.name: s.kept for s in report.spaces}["layer1"] == 71
    assert model.SerializeToString() == before
    assert relative_l2(run(model, x[:8]), run(pruned, x[:8])) < 1e-4


def test_layers_sharing_one_initializer_through_identity_are_pruned_each_on_its_own():
    """TorchScript writes one initializer for equal parameters (layers cloned from one another)
    and an Identity for every other use: each layer gets its own copy, so both are prunable, and
    the caller's model is left as it was."""
    from builders import GraphBuilder

    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(64, 72)).astype(np.float32)  # too large to be folded through the Identity
    w1[:, 7] = 2 * w1[:, 2]  # a planted copy in the first layer
    g = GraphBuilder(["N", 64])
    shared = g.const(w1, "w")
    h = g.op("Relu", [g.op("MatMul", ["x", shared], name="layer1")])
    h = g.op("MatMul", [h, g.const(rng.normal(size=(72, 64)).astype(np.float32) / 8, "w")], name="back")
    tied = g.op("Identity", [shared], name="tie")
    h = g.op("Relu", [g.op("MatMul", [h, tied], name="layer2")])
    model = g.build(g.op("MatMul", [h, g.const(rng.normal(size=(72, 3)).astype(np.float32), "w")], name="head"), ["N", 3])
    assert_both_layers_prune_on_their_own(model, rng)


def test_weights_computed_by_split_and_transpose_of_one_initializer_are_folded_and_pruned():
    """torch.export writes nn.MultiheadAttention's cross-attention projections as MatMuls whose
    weights are Split + Transpose of the packed in_proj_weight: those become initializers of their
    own (nothing duplicated), so both layers are prunable."""
    from builders import GraphBuilder

    rng = np.random.default_rng(4)
    packed = rng.normal(size=(144, 64)).astype(np.float32) / 8  # [out, in] of two layers of 72, too large to fold lazily
    packed[7] = 2 * packed[2]  # a planted copy among the first layer's outputs
    g = GraphBuilder(["N", 64])
    parts = [f"part{i}" for i in range(2)]
    g.nodes.append(helper.make_node("Split", [g.const(packed, "packed"), g.const(np.array([72, 72], dtype=np.int64), "sizes", dtype=np.int64)],
                                    parts, name="split", axis=0))
    first = g.op("Relu", [g.op("MatMul", ["x", g.op("Transpose", [parts[0]], perm=[1, 0])], name="layer1")])
    second = g.op("Relu", [g.op("MatMul", ["x", g.op("Transpose", [parts[1]], perm=[1, 0])], name="layer2")])
    both = g.op("Add", [g.matmul(first, rng.normal(size=(72, 3)).astype(np.float32)), g.matmul(second, rng.normal(size=(72, 3)).astype(np.float32))])
    model = g.build(both, ["N", 3])
    assert_both_layers_prune_on_their_own(model, rng)


def test_slices_of_a_packed_weight_with_bounds_computed_from_a_shape_are_folded_and_pruned():
    """TorchScript writes nn.MultiheadAttention's in-projection chunks (w.chunk(3) when q, k and v
    differ: DETR, cross-attention) as Slices of the packed weight whose bounds come from
    q.size(-1): at the analysis's shapes they are constants, and the parts become weights of
    their own."""
    from builders import GraphBuilder

    rng = np.random.default_rng(6)
    packed = rng.normal(size=(144, 64)).astype(np.float32) / 8
    packed[7] = 2 * packed[2]
    g = GraphBuilder(["N", 64])
    width = g.op("Mul", [g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", ["x"]), g.const(np.array(1, dtype=np.int64), "i", dtype=np.int64)], axis=0),
                                             g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64)]),
                         g.const(np.array([72 // 8], dtype=np.int64), "i", dtype=np.int64)])  # 64 / 8 * 9 = 72, read from x's shape
    width = g.op("Div", [width, g.const(np.array([8], dtype=np.int64), "i", dtype=np.int64)])
    weight = g.const(packed, "packed")
    zero, axis = g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64), g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64)
    parts = [g.op("Slice", [weight, zero, width, axis]), g.op("Slice", [weight, width, g.op("Add", [width, width]), axis])]
    first = g.op("Relu", [g.op("MatMul", ["x", g.op("Transpose", [parts[0]], perm=[1, 0])], name="layer1")])
    second = g.op("Relu", [g.op("MatMul", ["x", g.op("Transpose", [parts[1]], perm=[1, 0])], name="layer2")])
    both = g.op("Add", [g.matmul(first, rng.normal(size=(72, 3)).astype(np.float32)), g.matmul(second, rng.normal(size=(72, 3)).astype(np.float32))])
    assert_both_layers_prune_on_their_own(g.build(both, ["N", 3]), rng)


def test_a_table_cut_to_the_sequence_length_stays_computed():
    """A position table Sliced to the input's sequence length (BERT's position ids under
    torch.export) depends on a dynamic dim: it is not folded at the calibration's length."""
    from builders import GraphBuilder, run

    rng = np.random.default_rng(7)
    g = GraphBuilder(["N", "S", 16])
    g.inputs[0].type.tensor_type.shape.dim[1].dim_param = "S"
    length = g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", ["x"]), g.const(np.array(1, dtype=np.int64), "i", dtype=np.int64)], axis=0),
                                g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64)])
    table = g.op("Slice", [g.const(rng.normal(size=(64, 16)).astype(np.float32), "positions"),
                           g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64), length,
                           g.const(np.array([0], dtype=np.int64), "i", dtype=np.int64)])
    h = g.op("Relu", [g.matmul(g.op("Add", ["x", table]), rng.normal(size=(16, 32)).astype(np.float32), name="up")])
    model = g.build(g.matmul(h, rng.normal(size=(32, 4)).astype(np.float32), name="down"), ["N", "S", 4])
    pruned, _ = onnxprune.prune(model, {"x": rng.normal(size=(64, 8, 16)).astype(np.float32)}, ratio=0.3)
    short = rng.normal(size=(2, 5, 16)).astype(np.float32)
    assert run(pruned, short).shape == run(model, short).shape == (2, 5, 4)


def test_a_layer_whose_weight_is_cast_at_run_time_is_reported_not_silently_skipped():
    """An int8-stored weight dequantised to float32 before its MatMul: the layer is not analysed,
    and the report names it with the reason (it used to vanish from the report). (An fp16 weight
    Cast to float is folded and pruned since session 18: tests/test_old_exports.py.)"""
    from builders import GraphBuilder

    rng = np.random.default_rng(5)
    g = GraphBuilder(["N", 64])
    scale = g.const(np.array(0.02, dtype=np.float32), "scale")
    weight = g.op("DequantizeLinear", [g.const(rng.integers(-100, 100, size=(64, 72)), "w8", dtype=np.int8), scale], name="dequant")
    h = g.op("Relu", [g.op("MatMul", ["x", weight], name="stored_half")])
    h = g.op("Relu", [g.matmul(h, rng.normal(size=(72, 6)).astype(np.float32), name="plain")])
    model = g.build(g.matmul(h, rng.normal(size=(6, 3)).astype(np.float32), name="head"), ["N", 3])
    found = {s.name: s for s in onnxprune.inspect_model(model).spaces}
    assert found["stored_half"].units == 72
    assert found["stored_half"].pinned == ["MatMul 'stored_half' reads a weight computed at run time (DequantizeLinear 'dequant'): its units are not analysed"]
    assert not found["plain"].pinned
    _, report = onnxprune.prune(model, {"x": rng.normal(size=(64, 64)).astype(np.float32)}, ratio=0.3)
    assert any("stored_half" in s.name and s.pinned for s in report.spaces)


def test_a_classifier_conv_flattened_into_the_output_says_graph_output():
    """SqueezeNet's classifier is a conv whose pooled, flattened output is the graph output: its
    pin names the graph output, not a missing linear layer."""
    from builders import GraphBuilder

    rng = np.random.default_rng(2)
    g = GraphBuilder(["N", 3, 8, 8])
    h = g.op("Relu", [g.conv("x", rng.normal(size=(8, 3, 3, 3)).astype(np.float32), np.zeros(8, np.float32), name="features", pads=[1, 1, 1, 1])])
    c = g.op("Relu", [g.conv(h, rng.normal(size=(5, 8, 1, 1)).astype(np.float32), np.zeros(5, np.float32), name="classifier")])
    model = g.build(g.op("Flatten", [g.op("GlobalAveragePool", [c])], name="flatten"), ["N", 5])
    found = {s.name: s for s in onnxprune.inspect_model(model).spaces}
    assert "is a graph output (through Flatten 'flatten')" in found["classifier"].pinned[0]
    assert not found["features"].pinned
