"""Verification's optimisation check (issue 14): the pruned model's output with onnxruntime's
graph optimisations on and off is compared with the original's own on/off difference on the same
samples, so a model that is itself optimisation-sensitive or has tiny outputs is accepted, while a
rewrite whose result depends on the optimisations is still refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from builders import GraphBuilder, random_mlp, run
from onnxprune.data import CalibrationData
from onnxprune.verify import verify

RNG = np.random.default_rng(11)


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def cancelling_model() -> onnx.ModelProto:
    """conv_a (unit 5 a planted copy of unit 1, BN included) -> conv_b -> GAP, read by two Gemms
    whose weights differ by 1e-6: the output is their difference, ~1e-5, so the float32 rounding of
    the ~1 intermediate values (which onnxruntime's fused kernels change) is a tenth of it."""
    g = GraphBuilder([1, 3, 8, 8])
    wa, ba = normal(8, 3, 3, 3), normal(8)
    gamma, beta, mean, var = 1 + normal(8, scale=0.1), normal(8), normal(8), 1 + np.abs(normal(8))
    for p in (wa, ba, gamma, beta, mean, var):
        p[5] = p[1]
    h = g.op("Relu", [g.bn(g.conv("x", wa, ba, name="conv_a", pads=[1, 1, 1, 1]), gamma, beta, mean, var)])
    c = g.op("Relu", [g.conv(h, normal(16, 8, 3, 3), normal(16), name="conv_b", pads=[1, 1, 1, 1])])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    w = normal(16, 4)
    y = g.op("Sub", [g.gemm(f, w, name="fc1"), g.gemm(f, w + normal(16, 4, scale=1e-6), name="fc2")])
    return g.build(y, ["N", 4])


def test_a_model_sensitive_to_optimisations_with_tiny_outputs_is_accepted():
    model = cancelling_model()
    x = RNG.normal(size=(96, 3, 8, 8)).astype(np.float32)
    on, off = run(model, x[:8]), run(model, x[:8], optimize=False)
    scale, difference = np.abs(on).max(), np.abs(on - off).max()
    assert scale < 1e-4 and difference > 1e-2 * scale, "the original itself changes with the optimisations, relative to its outputs"
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    row = next(r for r in report.spaces if r.name == "conv_a")
    assert (row.kept, row.units) == (7, 8)
    onnx.checker.check_model(pruned, full_check=True)


def with_training_dropout(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deliberately broken rewrite: Dropout in training mode before the output, so the result
    changes from one run to the next (and between optimised and unoptimised sessions)."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    graph = broken.graph
    out = graph.output[0].name
    graph.node[-1].output[0] = "before_dropout"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0.5, np.float32), "drop_ratio"),
                              onnx.numpy_helper.from_array(np.array(True), "drop_training")])
    graph.node.append(helper.make_node("Dropout", ["before_dropout", "drop_ratio", "drop_training"], [out], name="broken_dropout"))
    onnx.checker.check_model(broken, full_check=True)
    return broken


def small_cnn() -> onnx.ModelProto:
    g = GraphBuilder([1, 3, 6, 6])
    a = g.op("Relu", [g.conv("x", normal(6, 3, 3, 3), normal(6), name="conv_a", pads=[1, 1, 1, 1])])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [a])])
    return g.build(g.gemm(f, normal(6, 3), normal(3), name="fc"), ["N", 3])


def test_a_rewrite_whose_output_depends_on_the_optimisations_is_refused():
    model = small_cnn()
    data = CalibrationData({"x": RNG.normal(size=(16, 3, 6, 6)).astype(np.float32)})
    verify(model, model, data, batch_size=8)  # the unchanged model passes
    with pytest.raises(onnxprune.ModelError, match="differs with onnxruntime optimisations on and off"):
        verify(model, with_training_dropout(model), data, batch_size=8)


def test_the_optimisation_probe_keeps_time_first_outputs_aligned_with_their_inputs():
    """A CRNN's logits are [T, N, C]: cutting the first samples off axis 0 would cut time steps
    and compare outputs of different inputs (an infinite difference on both models, which let
    any pruned model through); the probe keeps the whole batch there, and cuts batch-first ones."""
    from onnxprune.calibrate import make_session
    from onnxprune.verify import _on_off_difference, _probe

    model = onnx.load("models/crnn_digits.ts.onnx")
    batch = {"input": np.load("models/data/crnn_calib.npz")["input"][:20]}
    logits = {"logits": make_session(model).run(None, batch)[0]}
    probe = _probe(batch, logits, batch, logits, 8)
    assert len(probe.original_inputs["input"]) == 20 and probe.original_outputs["logits"].shape == (28, 20, 11)
    assert _on_off_difference(model, probe.original_inputs, probe.original_outputs)["logits"] < 1e-3
    flat = {"logits": np.zeros((20, 11), dtype=np.float32)}
    assert len(_probe(batch, flat, batch, flat, 8).original_inputs["input"]) == 8


def test_top1_agreement_per_position_for_logits_and_none_for_integer_outputs():
    """A language model's logits [N, T, V] get the next-token agreement over every position; an
    integer output passed through gets none; other 3-D outputs none."""
    from onnxprune.verify import _Agreement

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 6, 11)).astype(np.float32)
    got = ref + 0.5 * rng.normal(size=ref.shape).astype(np.float32)
    logits, other = _Agreement("logits", logits=True), _Agreement("hidden")
    logits.add(ref[:3], got[:3])
    logits.add(ref[3:], got[3:])
    other.add(ref, got)
    want = np.mean(ref.argmax(-1) == got.argmax(-1))
    assert 0 < want < 1 and logits.result().top1_agreement == pytest.approx(want)
    assert other.result().top1_agreement is None
    ids = _Agreement("ids")
    ids.add(np.arange(12).reshape(3, 4), np.arange(12).reshape(3, 4))
    assert ids.result().top1_agreement is None and ids.result().relative_l2 == 0


def test_a_language_model_reports_its_next_token_agreement():
    calib = dict(np.load("models/transformers/calib_tokens.npz"))
    _, report = onnxprune.prune("models/transformers/llama_tiny.ts.onnx", calib, ratio=0.3)
    (logits,) = report.fidelity
    assert logits.name == "logits" and 0 < logits.top1_agreement < 1


def test_far_outputs_are_named_in_a_warning() -> None:
    """A pruned model far from the original on the held-out samples is written with a warning
    naming the output and how far it is; a close one gets none."""
    from onnxprune.verify import OutputFidelity, far_outputs_warning

    close = OutputFidelity("y", 0.1, 0.99, 0.5, 0.97)
    assert far_outputs_warning([close]) == []
    (warning,) = far_outputs_warning([close, OutputFidelity("logits", 0.3, 0.9, 2.0, 0.35)])
    assert "'logits'" in warning and "35%" in warning and "'y'" not in warning
    model = random_mlp(widths=(12, 32, 5), seed=1)
    x = np.random.default_rng(0).standard_normal((200, 12)).astype(np.float32)
    _, report = onnxprune.prune(model, {"x": x}, ratio=0.95, seed=0, method="random")
    far = [f for f in report.fidelity if f.relative_l2 >= 0.8 or (f.top1_agreement or 1) < 0.5]
    assert far and any("far from the original" in w for w in report.warnings)


def test_report_samples_measure_the_fidelity_and_nothing_else() -> None:
    """--report-samples: the last N samples only measure the report's fidelity. Changing them
    leaves the pruned model bit for bit the same (no choice read them) and changes the numbers
    reported; without them the report says its samples also chose the model."""
    model = random_mlp(widths=(12, 32, 24, 5), seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)).astype(np.float32)
    first, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, report_samples=40)
    other = x.copy()
    other[-40:] = 3 * rng.standard_normal((40, 12)).astype(np.float32)
    second, other_report = onnxprune.prune(model, {"x": other}, flops=0.4, seed=0, report_samples=40)
    assert first.SerializeToString() == second.SerializeToString()
    assert report.fidelity_independent and report.verification_samples == 40
    assert report.fidelity[0].relative_l2 != other_report.fidelity[0].relative_l2
    expected = relative_l2_of(model, first, x[-40:])
    assert abs(report.fidelity[0].relative_l2 - expected) < 1e-4 * max(expected, 1e-6) + 1e-7
    assert "no choice of the run read" in report.markdown()
    _, plain = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    assert not plain.fidelity_independent and "expect larger errors on new data" in plain.markdown()
    with pytest.raises(onnxprune.errors.CalibrationError, match="--report-samples 300"):
        onnxprune.prune(model, {"x": x}, flops=0.4, report_samples=300)


def relative_l2_of(model: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> float:
    reference, got = run(model, x), run(pruned, x)
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def _argmax_head(axis: int = -1) -> onnx.ModelProto:
    """x [N, T, 8] -> MatMul -> Add -> ArgMax(axis) -> ids (greedy CTC decoding in the graph)."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["scores"]),
             helper.make_node("ArgMax", ["scores"], ["ids"], axis=axis, keepdims=0)]
    graph = helper.make_graph(nodes, "greedy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.zeros(5, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_argmax_output_is_judged_by_the_scores_it_reads():
    """A graph that ends in ArgMax: candidates are compared on the class scores the ArgMax reads
    (KL, along its axis), which move when the indices on a few samples do not; the model handed
    in keeps its outputs; the report gives the share of indices left unchanged."""
    from onnx import numpy_helper

    from onnxprune.fidelity import ReferenceOutputs
    from onnxprune.verify import _Agreement, argmax_outputs

    model = _argmax_head()
    assert argmax_outputs(model) == {"ids": ("scores", -1, "logits")}
    assert argmax_outputs(_argmax_head(axis=1)) == {"ids": ("scores", 1, "logits")}
    x = np.random.default_rng(4).normal(size=(6, 3, 8)).astype(np.float32)
    reference = ReferenceOutputs(model, CalibrationData({"x": x}), batch_size=6, samples=6)
    assert [o.name for o in model.graph.output] == ["ids"]
    nudged = onnx.ModelProto()
    nudged.CopyFrom(model)
    w = numpy_helper.to_array(nudged.graph.initializer[0])
    nudged.graph.initializer[0].CopyFrom(numpy_helper.from_array((w * 1.01).astype(np.float32), "w"))
    np.testing.assert_array_equal(run(model, x), run(nudged, x))  # the same indices ...
    assert reference.error(nudged, {}) > 1e-6  # ... yet the candidate is not the original
    assert reference.error(model, {}) == pytest.approx(0.0, abs=1e-12)
    ids = _Agreement("ids", indices=True)
    ids.add(np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 0]]))
    assert ids.result().top1_agreement == pytest.approx(0.75)


def test_a_segmentation_mask_is_judged_by_the_kl_along_its_class_axis():
    """ArgMax over the channels of a [N, C, H, W] score map: the KL is taken per pixel along C."""
    from onnx import TensorProto, numpy_helper

    from onnxprune.fidelity import ReferenceOutputs

    rng = np.random.default_rng(8)
    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["scores"]), helper.make_node("ArgMax", ["scores"], ["mask"], axis=1, keepdims=0)],
                              "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
                              [helper.make_tensor_value_info("mask", TensorProto.INT64, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    reference = ReferenceOutputs(model, CalibrationData({"x": x}), batch_size=2, samples=2)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(w * 0.5, "w"))
    z_ref = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x)
    lp = z_ref - np.log(np.exp(z_ref).sum(1, keepdims=True))
    lq = 0.5 * z_ref - np.log(np.exp(0.5 * z_ref).sum(1, keepdims=True))
    want = float(np.sum(np.exp(lp) * (lp - lq)) / (2 * 5 * 5))
    assert reference.error(other, {}) == pytest.approx(want, rel=1e-4)
