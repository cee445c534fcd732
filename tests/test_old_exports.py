"""Models as older exporters wrote them: weights listed as graph inputs (IR version 3,
`keep_initializers_as_inputs=True`), attribute forms of shape ops below opset 13, Upsample and
opset-10 Resize, training-mode BatchNormalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

import onnxprune
from builders import random_cnn, relative_l2, run, treat_as_large


def _weights_as_inputs(model: onnx.ModelProto, ir_version: int) -> onnx.ModelProto:
    legacy = onnx.ModelProto()
    legacy.CopyFrom(model)
    legacy.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in legacy.graph.initializer)
    legacy.ir_version = ir_version
    return legacy


def test_weights_listed_as_graph_inputs_are_pruned_like_plain_weights() -> None:
    """IR 3 listed every initializer as an input: the pruned model keeps them as weights only
    (raising the IR version to 4), prunes as much, and its outputs match the original's."""
    model = random_cnn(channels=(3, 16, 24, 8), seed=2)
    x = np.random.default_rng(0).standard_normal((160, 3, 8, 8)).astype(np.float32)
    expected, plain_report = onnxprune.prune(model, {"x": x}, flops=0.3, seed=0)
    for ir_version in (3, model.ir_version):
        legacy = _weights_as_inputs(model, ir_version)
        before = legacy.SerializeToString()
        pruned, report = onnxprune.prune(legacy, {"x": x}, flops=0.3, seed=0)
        assert legacy.SerializeToString() == before  # the input model is never modified
        assert [i.name for i in pruned.graph.input] == ["x"] and pruned.ir_version >= 4
        assert report.macs_after == plain_report.macs_after
        assert any("listed as graph inputs" in w for w in report.warnings)
        fresh = np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(run(pruned, fresh), run(expected, fresh), rtol=1e-5, atol=1e-5)
        assert relative_l2(run(pruned, fresh), run(legacy, fresh)) < 0.5


def test_inspect_names_the_weights_that_were_inputs() -> None:
    legacy = _weights_as_inputs(random_cnn(), 3)
    report = onnxprune.inspect_model(legacy)
    assert any("listed as graph inputs" in note for note in report.notes)
    assert sum(not s.pinned for s in report.spaces) == sum(not s.pinned for s in onnxprune.inspect_model(random_cnn()).spaces)


def _conv_net(opset: int, middle: list[onnx.NodeProto], extra_inits: list[onnx.TensorProto], head: str = "gap",
              training_bn: bool = False) -> onnx.ModelProto:
    """x -> conv1 (8) -> Relu -> `middle` (reads 'r1', writes 'm') -> conv2 (6) -> Relu -> head -> fc (4)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)
    inits = [init("w1", 8, 3, 3, 3), init("b1", 8), init("w2", 6, 8, 3, 3), init("b2", 6), *extra_inits]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"), *middle,
             helper.make_node("Conv", ["m", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2")]
    if training_bn:
        inits += [onnx.numpy_helper.from_array(np.ones(6, np.float32), n) for n in ("s", "v")]
        inits += [onnx.numpy_helper.from_array(np.zeros(6, np.float32), n) for n in ("b", "mu")]
        nodes.append(helper.make_node("BatchNormalization", ["r2", "s", "b", "mu", "v"], ["bn", "run_mean", "run_var", "saved_mean", "saved_var"],
                                      name="bn"))
        nodes.append(helper.make_node("Identity", ["bn"], ["r2b"], name="id"))
        last = "r2b"
    else:
        last = "r2"
    if head == "gap":
        nodes += [helper.make_node("GlobalAveragePool", [last], ["p"], name="gap"), helper.make_node("Flatten", ["p"], ["f"], name="flatten")]
    else:  # x.reshape(x.size(0), -1) as exported below opset 13: Unsqueeze with an axes attribute
        inits.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"))
        inits.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
        nodes += [helper.make_node("MaxPool", [last], ["p"], name="pool", kernel_shape=[8, 8]),
                  helper.make_node("Shape", ["p"], ["shape"], name="shape"),
                  helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
                  helper.make_node("Unsqueeze", ["batch"], ["batch1"], name="unsqueeze", axes=[0]),
                  helper.make_node("Concat", ["batch1", "minus_one"], ["target"], name="concat", axis=0),
                  helper.make_node("Reshape", ["p", "target"], ["f"], name="reshape")]
    inits += [init("wf", 4, 6), onnx.numpy_helper.from_array(np.zeros(4, np.float32), "bf")]
    nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model


def _pool_upsample(opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    pool = helper.make_node("MaxPool", ["r1"], ["half"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    if opset == 7:
        return [pool, helper.make_node("Upsample", ["half"], ["m"], name="up", scales=[1.0, 1.0, 2.0, 2.0])], []
    op = "Upsample" if opset == 9 else "Resize"
    return [pool, helper.make_node(op, ["half", "scales"], ["m"], name="up")], [scales]


def _prunable(model: onnx.ModelProto | Path) -> set[str]:
    return {s.name for s in onnxprune.inspect_model(model).spaces if not s.pinned}


def test_upsample_and_opset_10_resize_keep_the_channel_axis() -> None:
    """Upsample (opsets 7 and 9, scales an attribute or input 1) and Resize-10 (scales at input 1)
    carry channels like Resize-11: the conv before them is pruned and the outputs match."""
    x = np.random.default_rng(1).standard_normal((120, 3, 8, 8)).astype(np.float32)
    for opset in (7, 9, 10):
        model = _conv_net(opset, *_pool_upsample(opset))
        assert "conv1" in _prunable(model), opset
        pruned, report = onnxprune.prune(model, {"x": x}, flops=0.3, seed=0)
        kept = {s.name: s.kept for s in report.spaces}
        assert kept["conv1"] < 8, opset
        fresh = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
        assert relative_l2(run(model, fresh), run(pruned, fresh)) < 0.6


def test_computed_flatten_shape_below_opset_13_folds_at_the_models_opset() -> None:
    """reshape(x.size(0), -1) below opset 13 (Unsqueeze with an `axes` attribute): the shape
    arithmetic is evaluated at the model's opset, so the last conv stays prunable."""
    identity = [helper.make_node("Identity", ["r1"], ["m"], name="pass")]
    for opset in (9, 11):
        model = _conv_net(opset, identity, [], head="reshape")
        assert "conv2" in _prunable(model)
        x = np.random.default_rng(1).standard_normal((120, 3, 8, 8)).astype(np.float32)
        pruned, _ = onnxprune.prune(model, {"x": x}, flops=0.3, seed=0)
        fresh = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
        assert run(pruned, fresh).shape == (16, 4)


def test_training_mode_batch_norm_is_refused_with_the_way_out(tmp_path, capsys) -> None:
    """BatchNormalization with its running-statistics outputs runs on batch statistics: outputs
    depend on the batch, so the model is refused (exit 2) and `inspect` says why."""
    from builders import cli

    model = _conv_net(9, [helper.make_node("Identity", ["r1"], ["m"], name="pass")], [], training_bn=True)
    path = tmp_path / "train.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    code, out, err = cli([str(path), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out.onnx"), "--flops", "0.2"], capsys)
    assert code == 2 and "training mode" in err and "BatchNormalization 'bn'" in err and "eval" in err
    assert not (tmp_path / "out.onnx").exists()
    assert any("training mode" in note for note in onnxprune.inspect_model(model).notes)


def test_a_conv_reading_a_computed_weight_says_so() -> None:
    """A Conv whose weight is computed at run time (an int8 weight dequantised) is pinned with
    that reason, not as a grouped Conv."""
    q = onnx.numpy_helper.from_array(np.random.default_rng(0).integers(-100, 100, (8, 8, 9, 9)).astype(np.int8), "q")
    scale = onnx.numpy_helper.from_array(np.array(0.01, np.float32), "scale")
    middle = [helper.make_node("DequantizeLinear", ["q", "scale"], ["wq"], name="dequant"),
              helper.make_node("Conv", ["r1", "wq"], ["m"], name="conv_mid", pads=[4, 4, 4, 4])]
    spaces = {s.name: s for s in onnxprune.inspect_model(_conv_net(13, middle, [q, scale])).spaces}
    reasons = " ".join(spaces["conv1"].pinned)
    assert "not a constant" in reasons and "grouped" not in reasons


def test_fp16_weights_cast_to_float_are_pruned_and_stored_as_fp16_again() -> None:
    """Mixed-precision storage (fp16 weights, a Cast to float before each layer): the layers are
    pruned like float ones, and the pruned weights are written as fp16 + Cast again (the file
    shrinks, it does not double)."""
    model = _conv_net(13, [helper.make_node("Identity", ["r1"], ["m"], name="pass")], [])
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for tensor in list(half.graph.initializer):
        if tensor.name in ("w1", "w2", "wf"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16), tensor.name + "_h"))
            half.graph.node.insert(0, helper.make_node("Cast", [tensor.name], [tensor.name[:-2]], name="cast_" + tensor.name, to=1))
    onnx.checker.check_model(half)
    assert {"conv1", "conv2"} <= _prunable(half)
    x = np.random.default_rng(1).standard_normal((160, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(half, {"x": x}, flops=0.3, seed=0)
    assert {s.name: s.kept for s in report.spaces}["conv1"] < 8
    weights = {t.name: t for t in pruned.graph.initializer}
    readers = [n for n in pruned.graph.node if n.op_type in ("Conv", "Gemm")]
    for node in readers:
        cast = next(n for n in pruned.graph.node if n.output[0] == node.input[1])
        assert cast.op_type == "Cast" and weights[cast.input[0]].data_type == onnx.TensorProto.FLOAT16
    assert not any(p.key.startswith("onnxprune") for p in pruned.metadata_props)
    assert len(pruned.SerializeToString()) < len(half.SerializeToString())
    fresh = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert relative_l2(run(half, fresh), run(pruned, fresh)) < 0.5


def test_a_large_models_fp16_weights_stay_fp16(tmp_path, monkeypatch) -> None:
    """A large model's weights wait in a temporary file during the run (the refitted model
    while the guard scores it): its folded float weights are written back as fp16 + Cast from
    there too (they came back as float, doubling a big model's file)."""
    treat_as_large(monkeypatch)
    middle = [helper.make_node("Cast", ["wm_h"], ["wm"], name="cast_wm", to=1),
              helper.make_node("Conv", ["r1", "wm"], ["m"], name="conv_mid", pads=[1, 1, 1, 1])]
    wm = onnx.numpy_helper.from_array((np.random.default_rng(3).standard_normal((8, 8, 3, 3)) / 8).astype(np.float16), "wm_h")
    model = _conv_net(13, middle, [wm])
    path = tmp_path / "half.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).standard_normal((160, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(path, {"x": x}, flops=0.2, seed=0)
    assert report.fit["mode"] == "sequential" and report.units_after < report.units_before
    weights = {t.name: t for t in pruned.graph.initializer}
    cast = next(n for n in pruned.graph.node if n.output[0] == "wm")
    assert cast.op_type == "Cast" and weights[cast.input[0]].data_type == onnx.TensorProto.FLOAT16
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in pruned.graph.initializer)
    fresh = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 0.5


def test_fp16_weights_in_external_data_cast_to_float_are_pruned(tmp_path) -> None:
    """The same storage with the weights in an external-data file (optimum's model.onnx +
    model.onnx_data, every model over 2 GiB): the Casts are folded too (the layers were pinned as
    reading a weight computed at run time), and the pruned weights are fp16 + Cast again."""
    middle = [helper.make_node("Cast", ["wm_h"], ["wm"], name="cast_wm", to=1),
              helper.make_node("Conv", ["r1", "wm"], ["m"], name="conv_mid", pads=[1, 1, 1, 1])]
    wm = onnx.numpy_helper.from_array((np.random.default_rng(3).standard_normal((8, 8, 3, 3)) / 8).astype(np.float16), "wm_h")
    model = _conv_net(13, middle, [wm])
    path = tmp_path / "half.onnx"
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), path, save_as_external_data=True, all_tensors_to_one_file=True, location="half.onnx_data", size_threshold=0)
    assert "conv_mid" in _prunable(path)
    x = np.random.default_rng(1).standard_normal((160, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(path, {"x": x}, flops=0.3, seed=0)
    assert not next(s for s in report.spaces if s.name == "conv_mid").pinned and report.units_after < report.units_before
    weights = {t.name: t for t in pruned.graph.initializer}
    cast = next(n for n in pruned.graph.node if n.output[0] == "wm")
    assert cast.op_type == "Cast" and weights[cast.input[0]].data_type == onnx.TensorProto.FLOAT16
    fresh = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 0.5


def test_a_fixed_batch_above_one_is_analysed_at_that_batch() -> None:
    """A static export with batch 2 bakes the batch into constant Reshape targets: the analysis
    runs the model at its own batch, so the layers stay prunable (at batch 1 the Reshape looked
    like it mixed the units' axis with the batch)."""
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((32, 12)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((5, 32)).astype(np.float32) / 6, "w2")
    target = onnx.numpy_helper.from_array(np.array([2, 32], np.int64), "target")
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "target"], ["flat"], name="reshape"),
             helper.make_node("Gemm", ["flat", "w2"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "static", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 12])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])], [w1, w2, target])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((200, 12)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.3, seed=0)
    assert {s.name: s.kept for s in report.spaces}["fc1"] < 32
    assert run(pruned, x[:2]).shape == (2, 5)


def test_lrn_pins_its_channels_with_the_reason_and_the_rest_prunes() -> None:
    """AlexNet's LRN couples neighbouring channels: the conv before it is pinned, with a reason
    that says why; the conv after it still prunes, and the output is unchanged where nothing goes."""
    from builders import GraphBuilder

    rng = np.random.default_rng(3)
    g = GraphBuilder([1, 3, 8, 8])
    lrn = g.op("LRN", [g.op("Relu", [g.conv("x", rng.normal(size=(6, 3, 3, 3)).astype(np.float32), np.zeros(6, np.float32), name="c1",
                                            pads=[1, 1, 1, 1])])], size=3)
    c2 = g.op("Relu", [g.conv(lrn, rng.normal(size=(5, 6, 1, 1)).astype(np.float32), np.zeros(5, np.float32), name="c2")])
    model = g.build(g.gemm(g.op("Flatten", [g.op("GlobalAveragePool", [c2])]), rng.normal(size=(5, 2)).astype(np.float32),
                           np.zeros(2, np.float32), name="fc"), [None, 2])
    spaces = {s.name: s for s in onnxprune.inspect_model(model, input_shapes={"x": (2, 3, 8, 8)}).spaces}
    assert any("LRN" in r and "neighbours" in r and "not prunable" in r for r in spaces["c1"].pinned)
    assert not spaces["c2"].pinned
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    pruned, _ = onnxprune.prune(model, {"x": x}, ratio=0.0)
    assert relative_l2(run(model, x[:4]), run(pruned, x[:4])) == 0
