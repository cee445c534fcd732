"""Ops of other domains than ONNX's own are never taken for the standard op of the same name
(onnxruntime's blocked-layout com.microsoft.nchwc Conv reads other weights and channel counts);
the onnxruntime contrib ops that onnxprune knows keep their rules under their qualified names."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import random_cnn, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.errors import ModelError
from onnxprune.ops import op_key


def _mlp(activation: str, domain: str, copy: bool = True) -> tuple[onnx.ModelProto, np.ndarray]:
    """x [N, 8] -> MatMul (16 units, unit 9 a copy of unit 2) -> `activation` -> MatMul -> y [N, 4]."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    if copy:
        w1[:, 9] = w1[:, 2]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node(activation, ["h"], ["a"], domain=domain, name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model, rng.normal(size=(300, 8)).astype(np.float32)


def test_op_key_qualifies_other_domains() -> None:
    assert op_key(helper.make_node("Conv", ["x", "w"], ["y"])) == "Conv"
    assert op_key(helper.make_node("Conv", ["x", "w"], ["y"], domain="ai.onnx")) == "Conv"
    assert op_key(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.microsoft.nchwc")) == "com.microsoft.nchwc.Conv"


def test_an_op_of_another_domain_pins_the_units_it_reads() -> None:
    """A custom-domain "Relu" is not ONNX's Relu: the units it reads are pinned, with the op named."""
    standard, _ = _mlp("Relu", "")
    assert [s.pinned for s in analyse(standard).spaces if s.name == "up"] == [[]]
    custom, _ = _mlp("Relu", "org.example")
    (space,) = [s for s in analyse(custom).spaces if s.name == "up"]
    assert space.pinned and "org.example.Relu 'act'" in space.pinned[0]


def test_onnxruntime_gelu_contrib_op_is_a_pass_through() -> None:
    """com.microsoft Gelu is element-wise: the planted copy goes and the output is unchanged."""
    model, x = _mlp("Gelu", "com.microsoft")
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-5)
    assert (report.spaces[0].kept, report.spaces[0].units) == (15, 16)
    assert relative_l2(run(model, x[:20]), run(pruned, x[:20])) < 1e-4


def test_a_model_optimised_by_onnxruntime_is_refused_with_the_reason(tmp_path) -> None:
    """onnxruntime's offline optimisations write FusedConv (extended) and, on x86, blocked-layout
    com.microsoft.nchwc ops (all): no Conv rule may read them; the error names the ops."""
    model = random_cnn()
    source = tmp_path / "cnn.onnx"
    onnx.save(model, source)
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    checked = 0
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(tmp_path / "optimised.onnx")
        foreign = {op_key(n) for n in optimised.graph.node if op_key(n) != n.op_type}
        if not foreign:
            continue
        checked += 1
        with pytest.raises(ModelError, match="ops of other domains are not analysed"):
            onnxprune.prune(optimised, {"x": x}, ratio=0.3)
        assert any("ops of other domains are not analysed" in note for note in onnxprune.inspect_model(optimised).notes)
    if not checked:
        pytest.skip("onnxruntime fused nothing on this machine")


def test_a_quantised_model_is_refused_with_the_reason(tmp_path) -> None:
    """Dynamic quantisation leaves no float weight to prune: the error says to prune the float model first."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from builders import random_mlp

    onnx.save(random_mlp(), tmp_path / "mlp.onnx")
    quantize_dynamic(tmp_path / "mlp.onnx", tmp_path / "mlp.int8.onnx", weight_type=QuantType.QInt8)
    x = np.random.default_rng(0).standard_normal((64, 20)).astype(np.float32)
    with pytest.raises(ModelError, match="quantised layers are not analysed .*MatMulInteger.*prune the float model"):
        onnxprune.prune(str(tmp_path / "mlp.int8.onnx"), {"x": x}, ratio=0.3)


@pytest.mark.parametrize(("op", "opset"), [("SimplifiedLayerNormalization", 17), ("LayerNormalization", 13)])
def test_onnxruntime_ops_in_the_standard_domain_are_accepted(op: str, opset: int) -> None:
    """onnxruntime's optimizer writes SimplifiedLayerNormalization in the standard domain (and
    LayerNormalization was its contrib op there before opset 17): onnx.checker has no schema for
    them, onnxruntime runs them, so the model is pruned (it was refused as failing the checker)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(8, 24)).astype(np.float32), rng.normal(size=(24, 8)).astype(np.float32) / 5
    w1[:, 20:] = w1[:, :4]  # four planted copies
    norm_inputs = ["x", "scale"] + (["bias"] if op == "LayerNormalization" else [])
    nodes = [helper.make_node(op, norm_inputs, ["n"], name="norm", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["f"], name="down"), helper.make_node("Add", ["x", "f"], ["y"], name="residual")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "bias")]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    x = rng.normal(size=(200, 6, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-5)
    assert {s.name: (s.kept, s.units) for s in report.spaces}["up"] == (20, 24)
    assert next(n for n in pruned.graph.node if n.name == "norm").domain == ""
    assert relative_l2(run(model, x[:20]), run(pruned, x[:20])) < 1e-4
