"""The sensitivity allocation: every space pruned alone, its measured output error rescales its
energies; a branch whose output the model damps is pruned harder than the global threshold does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import cli, relative_l2, run
from onnxprune.errors import TargetError
from onnxprune.plan import Target
from onnxprune.sensitivity import Probe, default_probe_samples, gains_from, probe_target


def two_branches(damped: float = 0.02, width: int = 24, seed: int = 0) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm (branch a) + the same shape scaled by `damped` (branch b) -> y."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for branch, scale in (("a", 1.0), ("b", damped)):
        w1 = rng.standard_normal((16, width)).astype(np.float32) / 4
        w2 = (rng.standard_normal((width, 8)) * scale / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w1, f"{branch}_w1"), numpy_helper.from_array(np.zeros(width, np.float32), f"{branch}_b1"),
                  numpy_helper.from_array(w2, f"{branch}_w2"), numpy_helper.from_array(np.zeros(8, np.float32), f"{branch}_b2")]
        nodes += [helper.make_node("Gemm", ["x", f"{branch}_w1", f"{branch}_b1"], [f"{branch}_h"], name=f"{branch}_fc1"),
                  helper.make_node("Relu", [f"{branch}_h"], [f"{branch}_r"], name=f"{branch}_relu"),
                  helper.make_node("Gemm", [f"{branch}_r", f"{branch}_w2", f"{branch}_b2"], [f"{branch}_y"], name=f"{branch}_fc2")]
    nodes.append(helper.make_node("Add", ["a_y", "b_y"], ["y"], name="sum"))
    graph = helper.make_graph(nodes, "two_branches", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _kept(report) -> dict[str, int]:
    return {row.name: row.kept for row in report.spaces if not row.pinned}


def test_a_damped_branch_is_pruned_harder_and_the_output_error_falls() -> None:
    model = two_branches()
    calib = {"x": np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32)}
    fresh = np.random.default_rng(7).standard_normal((200, 16)).astype(np.float32)
    pruned_g, report_g = onnxprune.prune(model, calib, ratio=0.4, allocation="global")
    pruned_s, report_s = onnxprune.prune(model, calib, ratio=0.4, allocation="sensitivity")
    kept_g, kept_s = _kept(report_g), _kept(report_s)
    assert report_s.units_after == report_g.units_after  # the same budget
    assert kept_s["a_fc1"] > kept_g["a_fc1"] and kept_s["b_fc1"] < kept_g["b_fc1"]
    error_g, error_s = relative_l2(run(model, fresh), run(pruned_g, fresh)), relative_l2(run(model, fresh), run(pruned_s, fresh))
    assert error_s < 0.5 * error_g
    gains = {row["space"]: row["gain"] for row in report_s.sensitivity["spaces"]}
    assert gains["a_fc1"] > 50 * gains["b_fc1"]  # output error scales with damped**2 (gains clipped at 100x)
    assert "sensitivity allocation" in report_s.markdown()


def test_sensitivity_with_ratio_zero_is_bit_identical_and_tolerance_works() -> None:
    model = two_branches()
    calib = {"x": np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)}
    x = calib["x"][:50]
    pruned, report = onnxprune.prune(model, calib, ratio=0.0, allocation="sensitivity")
    np.testing.assert_array_equal(run(model, x), run(pruned, x))
    assert report.units_after == report.units_before
    _, report = onnxprune.prune(model, calib, tolerance=0.05, allocation="sensitivity")
    assert report.units_after < report.units_before


def test_gains_are_relative_to_the_median_with_a_floor() -> None:
    probes = {0: Probe(4, 0.1, 0.2), 1: Probe(4, 0.2, 0.2), 2: Probe(4, 0.1, 0.0), 3: Probe(4, 1e-9, 0.0), 5: Probe(4, 0.1, 1e3),
              6: Probe(4, 0.5, 0.5), 7: Probe(4, 0.3, 0.3)}
    gains = gains_from(probes, dict.fromkeys(range(8), 8))
    assert gains[0] == pytest.approx(2.0) and gains[1] == pytest.approx(1.0)
    assert gains[2] == pytest.approx(1e-2) and gains[5] == pytest.approx(1e2)  # clipped: one probe extrapolates only so far
    assert gains[3] == gains[4] == pytest.approx(1.0)  # no usable probe (no energy lost, none removable): the median


def test_probe_depth_and_sample_count() -> None:
    assert probe_target(Target("flops", 0.3)) == Target("flops", 0.3)
    assert probe_target(Target("ratio", 0.9)) == Target("ratio", 0.6)
    assert probe_target(Target("tolerance", 0.01)) == Target("ratio", 0.3)
    assert default_probe_samples(1000, 10) == 64
    assert default_probe_samples(28, 60) == 2
    assert default_probe_samples(100, 100) == 4


def test_cli_sensitivity_flags(tmp_path, capsys) -> None:
    model_path, calib_path, out = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "p.onnx"
    onnx.save(two_branches(), str(model_path))
    np.save(calib_path, np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32))
    code, stdout, _ = cli([model_path, "--calib", calib_path, "-o", out, "--ratio", "0.3", "--round-to", "1",
                           "--allocation", "sensitivity", "--sensitivity-samples", "16"], capsys)
    assert code == 0 and out.exists() and "sensitivity allocation" in stdout and "16 calibration samples" in stdout
    code, _, err = cli([model_path, "--calib", calib_path, "-o", out, "--ratio", "0.3", "--allocation", "sensitivity",
                        "--sensitivity-samples", "0"], capsys)
    assert code != 0 and "--sensitivity-samples" in err and len(err.strip().splitlines()) == 1


def test_sensitivity_planner_needs_gains() -> None:
    from onnxprune.plan import SensitivityPlanner

    with pytest.raises(TargetError, match="gains"):
        SensitivityPlanner({}, None)


def _budgeted(model, calib, **kw):
    pruned, report = onnxprune.prune(model, calib, flops=0.4, round_to=1, **kw)
    return pruned, report


def test_auto_allocation_chooses_the_candidate_with_the_lowest_heldout_error() -> None:
    model = two_branches()
    calib = {"x": np.random.default_rng(1).standard_normal((600, 16)).astype(np.float32)}
    _, report = _budgeted(model, calib, allocation="auto")
    errors = report.allocation["heldout_error"]
    assert set(errors) == {"global", "stream", "tempered", "uniform"} and report.allocation["samples"] > 0
    assert errors[report.allocation["chosen"]] == min(e for e in errors.values() if e is not None)
    # the chosen candidate's plan is the one written
    _, chosen = _budgeted(model, calib, allocation=report.allocation["chosen"])
    assert _kept(chosen) == _kept(report)
    assert "chosen by the output error" in report.markdown()


def test_auto_allocation_with_a_tolerance_spreads_its_size_by_the_chosen_rule() -> None:
    """A tolerance sets the MACs removed (the global threshold's at it); auto plans that budget
    with the candidate of lowest held-out error."""
    model = two_branches()
    calib = {"x": np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)}
    _, report_a = onnxprune.prune(model, calib, tolerance=0.05)
    _, report_g = onnxprune.prune(model, calib, tolerance=0.05, allocation="global")
    errors = report_a.allocation["heldout_error"]
    assert report_a.allocation["compared_at"].endswith("what --tolerance 0.05 removes with the global threshold")
    assert errors[report_a.allocation["chosen"]] == min(e for e in errors.values() if e is not None)
    assert report_a.macs_after == pytest.approx(report_g.macs_after, rel=0.05) and not report_g.allocation


def test_output_error_is_kl_for_logits_and_relative_l2_otherwise() -> None:
    from onnxprune.fidelity import OutputError, logit_outputs

    assert set(logit_outputs(two_branches())) == {"y"}  # Add of two Gemm heads
    rng = np.random.default_rng(0)
    ref, got = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    kl = OutputError(["y"], {"y": "logits"})
    kl.add({"y": ref}, {"y": got})
    p, q = np.exp(ref) / np.exp(ref).sum(1, keepdims=True), np.exp(got) / np.exp(got).sum(1, keepdims=True)
    assert kl.value() == pytest.approx(float(np.mean(np.sum(p * np.log(p / q), 1))))
    l2 = OutputError(["y"], {})
    l2.add({"y": ref}, {"y": got})
    assert l2.value() == pytest.approx(float(np.sum((got - ref) ** 2) / np.sum(ref ** 2)))
    same = OutputError(["y"], {"y": "logits"})
    same.add({"y": ref}, {"y": ref + 5.0})  # softmax ignores a shift: no decision changes
    assert same.value() == pytest.approx(0.0, abs=1e-12)


def test_output_error_kl_is_the_same_in_chunks(monkeypatch) -> None:
    """The logits' KL(original || pruned), computed a few rows at a time, equals the direct sum."""
    import onnxprune.fidelity as fidelity

    rng = np.random.default_rng(0)
    ref, got = rng.standard_normal((3, 7, 11)).astype(np.float32), rng.standard_normal((3, 7, 11)).astype(np.float32)
    lp = ref - np.log(np.exp(ref.astype(np.float64)).sum(-1, keepdims=True))
    lq = got - np.log(np.exp(got.astype(np.float64)).sum(-1, keepdims=True))
    expected = float(np.sum(np.exp(lp) * (lp - lq)) / 21)
    monkeypatch.setattr(fidelity, "LOGIT_ELEMENTS", 40)  # 3 rows per step
    error = fidelity.OutputError(["logits"], {"logits": "logits"})
    error.add({"logits": ref}, {"logits": got})
    assert error.value() == pytest.approx(expected, rel=1e-9)


def test_a_large_vocabulary_reference_keeps_its_top_classes(monkeypatch) -> None:
    """Over a large vocabulary the reference keeps each row's top classes and the rest's mass:
    the KL is exactly that of the distributions with the rest merged into one class (NumPy
    reference, in chunks too), equals the full KL where the rest holds no mass, and never
    exceeds it."""
    import onnxprune.fidelity as fidelity

    monkeypatch.setattr(fidelity, "TOP_CLASSES", 8)
    rng = np.random.default_rng(0)
    ref, got = (rng.standard_normal((2, 5, 40)) * 3).astype(np.float32), (rng.standard_normal((2, 5, 40)) * 3).astype(np.float32)
    assert fidelity.compressible(ref, "logits") and not fidelity.compressible(ref, None) and not fidelity.compressible(ref[..., :32], "logits")
    lp = ref.reshape(-1, 40).astype(np.float64)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = got.reshape(-1, 40).astype(np.float64)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    top = np.argsort(lp, -1)[:, -8:]
    p_top, q_top = np.exp(np.take_along_axis(lp, top, -1)), np.exp(np.take_along_axis(lq, top, -1))
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    merged = float(np.sum(p_top * np.log(p_top / q_top)) + np.sum(p_rest * np.log(p_rest / q_rest))) / 10
    full = float(np.sum(np.exp(lp) * (lp - lq))) / 10
    for elements in (1 << 21, 90):  # one step; 2 rows per step
        monkeypatch.setattr(fidelity, "LOGIT_ELEMENTS", elements)
        error = fidelity.OutputError(["logits"], {"logits": "logits"})
        error.add({"logits": fidelity.TopClasses.of(ref, False)}, {"logits": got})
        assert error.value() == pytest.approx(merged, rel=1e-5) and error.value() < full
    peaked = ref.copy()
    peaked[..., 8:] = -60.0  # the other classes hold no mass
    error = fidelity.OutputError(["logits"], {"logits": "logits"})
    error.add({"logits": fidelity.TopClasses.of(peaked, False)}, {"logits": got})
    whole = fidelity.OutputError(["logits"], {"logits": "logits"})
    whole.add({"logits": peaked}, {"logits": got})
    assert error.value() == pytest.approx(whole.value(), rel=1e-5)


def test_reference_outputs_score_more_samples_when_compressed(monkeypatch) -> None:
    """A model whose logits span a large vocabulary is scored on more held-out samples within
    the same memory (its reference rows compressed), one sample per run; its first outputs stay
    whole for the optimisation check, and a copy of the model scores 0."""
    from onnx import TensorProto, helper, numpy_helper

    import onnxprune.fidelity as fidelity
    from onnxprune.data import CalibrationData

    monkeypatch.setattr(fidelity, "TOP_CLASSES", 16)
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((6, 200)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "lm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 12, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 12, 200])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = CalibrationData({"x": np.random.default_rng(1).standard_normal((20, 12, 6)).astype(np.float32)})
    monkeypatch.setattr(fidelity, "ELEMENTS_MAX", 12 * 200 * 4)  # 4 whole samples
    reference = fidelity.ReferenceOutputs(model, data, 8, 20)
    assert reference.compressed == {"logits"} and reference.samples > 4 and len(reference.batches) == reference.samples
    assert isinstance(reference.outputs[0]["logits"], fidelity.TopClasses)
    assert reference.first_outputs["logits"].shape == (1, 12, 200)
    assert reference.error(model, {}) == pytest.approx(0.0, abs=1e-6)
    monkeypatch.setattr(fidelity, "CLASS_ROWS_MAX", 12 * 6)  # at most 6 samples' rows: the candidates' time bounded
    assert fidelity.ReferenceOutputs(model, data, 8, 20).samples == 6
    monkeypatch.setattr(fidelity, "TOP_CLASSES", 64)  # 200 classes: kept whole
    whole = fidelity.ReferenceOutputs(model, data, 8, 20)
    assert not whole.compressed and whole.samples == 4


def test_logits_whose_bias_add_comes_first_are_logits() -> None:
    """TorchScript writes a 3-D Linear (a CTC head) as Add(bias, MatMul): the head is found
    through the Add's computed input, so the output is scored as logits (KL, top-1)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.fidelity import logit_outputs

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["b", "m"], ["logits"])], "ctc",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["T", "N", 5])],
                              [numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.zeros(5, np.float32), "b")])
    assert logit_outputs(helper.make_model(graph)) == {"logits": "logits"}


def _softmax_head(op: str, axis: int | None, opset: int, rank: int = 3):
    """x [T, N, 8] (or [N, 8]) -> MatMul -> Add -> (Log)Softmax(axis) -> y."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = ["T", "N", 8][3 - rank:]
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["z"]), helper.make_node(op, ["z"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], 5])],
                              [numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.zeros(5, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_softmax_and_log_softmax_outputs_are_class_scores() -> None:
    """A classifier or CTC head that ends in Softmax / LogSoftmax over the last axis is scored
    as a class distribution (probabilities, or log-probabilities like logits); over another
    axis, or a flattening pre-13 Softmax of a 3-D tensor, it is not."""
    from onnxprune.fidelity import logit_outputs

    assert logit_outputs(_softmax_head("Softmax", None, 17)) == {"y": "probabilities"}
    assert logit_outputs(_softmax_head("LogSoftmax", -1, 17)) == {"y": "logits"}
    assert logit_outputs(_softmax_head("Softmax", 2, 17)) == {"y": "probabilities"}  # the last axis of a rank-3 output
    assert logit_outputs(_softmax_head("Softmax", 1, 17)) == {}  # over N: not one distribution per position
    assert logit_outputs(_softmax_head("Softmax", None, 11)) == {}  # opset 11 default axis 1 flattens T x N x C from N on
    assert logit_outputs(_softmax_head("Softmax", None, 11, rank=2)) == {"y": "probabilities"}


def test_output_error_of_probabilities_is_the_kl_of_their_logits() -> None:
    """Probabilities are compared by KL(original || pruned), the same number as for the logits
    they came from (relative L2 of probabilities hardly sees the classes that are not the top)."""
    from onnxprune.fidelity import OutputError

    rng = np.random.default_rng(1)
    ref, got = rng.standard_normal((40, 6)) * 3, rng.standard_normal((40, 6)) * 3
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    from_logits, from_probabilities = OutputError(["y"], {"y": "logits"}), OutputError(["y"], {"y": "probabilities"})
    from_logits.add({"y": ref}, {"y": got})
    from_probabilities.add({"y": softmax(ref).astype(np.float32)}, {"y": softmax(got).astype(np.float32)})
    assert from_probabilities.value() == pytest.approx(from_logits.value(), rel=1e-5)
    plain = OutputError(["y"], {})
    plain.add({"y": softmax(ref)}, {"y": softmax(got)})
    assert plain.value() != pytest.approx(from_logits.value(), rel=0.1)
