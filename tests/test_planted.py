"""Planted redundancy: SNP must find exactly the units that carry no information after the
nonlinearity (positively scaled copies through ReLU, identical copies through any activation,
dead units, constant units), remove nothing else, and the least-squares recovery must give
back the original model on fresh inputs. Magnitude pruning without recovery at the same number
of removed units must do measurably worse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import Planted, matching_units, planted_cnn, planted_mlp, random_cnn, random_mlp, relative_l2, run, run_tensors

TOLERANCE = 1e-5
CNN_VARIANTS = {
    "conv1x1": dict(),
    "bn_conv1x1": dict(bn=True),
    "maxpool_conv1x1": dict(pool=True),
    "bn_maxpool_conv1x1": dict(bn=True, pool=True),
    "conv3x3": dict(kernel=3),
    "bn_maxpool_conv3x3": dict(bn=True, pool=True, kernel=3),
}
MLP_VARIANTS = {
    "gemm_relu": dict(style="gemm"),
    "matmul_add_relu": dict(style="matmul"),
    "matmul_add_erf_gelu": dict(style="matmul", activation="ErfGelu"),
    "gemm_gelu_op": dict(style="gemm", activation="Gelu"),
    "gemm_tanh": dict(style="gemm", activation="Tanh"),
}


def _cnn(name: str) -> Planted:
    return planted_cnn(**CNN_VARIANTS[name])


def _mlp(name: str) -> Planted:
    return planted_mlp(**MLP_VARIANTS[name])


def _calib(planted: Planted) -> dict[str, np.ndarray]:
    return {"x": planted.inputs(64 if len(planted.input_shape) == 4 else 400, seed=1)}


def _fresh(planted: Planted) -> np.ndarray:
    return planted.inputs(40, seed=2024)  # never seen during calibration


def _kept_by_space(report) -> dict[str, tuple[int, int]]:
    return {row.name: (row.units, row.kept) for row in report.spaces}


def _assert_exactly_planted_removed(planted: Planted, pruned: onnx.ModelProto, report) -> None:
    kept = _kept_by_space(report)
    for space, n in planted.units.items():
        assert kept[space] == (n, n - planted.removable(space)), f"{space}: {kept[space]} (planted {planted.removable(space)} redundant)"
    assert report.units_before == planted.total_units
    assert report.units_after == planted.total_units - planted.total_removable
    # which units: every unit left in the pruned model must be an original unit (same activation
    # on fresh inputs) and the ones that are gone must be the planted ones
    x = _fresh(planted)
    names = list(planted.sites.values())
    for space, original, pruned_act in zip(planted.sites, run_tensors(planted.model, x, names), run_tensors(pruned, x, names), strict=True):
        axis = 1 if original.ndim == 4 else original.ndim - 1
        assert pruned_act.shape[axis] == planted.units[space] - planted.removable(space)
        planted.check_removed(space, matching_units(original, pruned_act, axis=axis))


@pytest.mark.parametrize("variant", list(CNN_VARIANTS))
def test_cnn_planted_units_removed_exactly(variant: str) -> None:
    planted = _cnn(variant)
    pruned, report = onnxprune.prune(planted.model, _calib(planted), tolerance=TOLERANCE)
    onnx.checker.check_model(pruned, full_check=True)
    _assert_exactly_planted_removed(planted, pruned, report)
    assert [row.kept for row in report.spaces if row.pinned] == [5]  # the output Gemm is pinned
    x = _fresh(planted)
    assert relative_l2(run(planted.model, x), run(pruned, x)) < 1e-4
    assert report.fidelity[0].relative_l2 < 1e-4
    # producers lost the planted filters, consumers the matching input channels
    weights = {t.name: t for t in pruned.graph.initializer}
    conv1 = next(n for n in pruned.graph.node if n.name == "conv1")
    conv2 = next(n for n in pruned.graph.node if n.name == "conv2")
    k = CNN_VARIANTS[variant].get("kernel", 1)
    assert tuple(weights[conv1.input[1]].dims) == (5, 3, 3, 3)
    assert tuple(weights[conv2.input[1]].dims) == (4, 5, k, k)


@pytest.mark.parametrize("variant", list(MLP_VARIANTS))
def test_mlp_planted_units_removed_exactly(variant: str) -> None:
    # The activation-energy order: these random MLPs also hold a unit that is nearly redundant
    # (3e-5 of fc2's activation energy, 2e-6 once weighted by the consumer), which the default
    # output-weighted order rightly removes at this tolerance too.
    planted = _mlp(variant)
    pruned, report = onnxprune.prune(planted.model, _calib(planted), tolerance=TOLERANCE, order="pivoted")
    onnx.checker.check_model(pruned, full_check=True)
    _assert_exactly_planted_removed(planted, pruned, report)
    x = _fresh(planted)
    assert relative_l2(run(planted.model, x), run(pruned, x)) < 1e-4
    weighted, weighted_report = onnxprune.prune(planted.model, _calib(planted), tolerance=TOLERANCE, order="weighted")
    assert all(r.units - r.kept >= planted.removable(r.name) for r in weighted_report.spaces if r.name in planted.units)
    assert relative_l2(run(planted.model, x), run(weighted, x)) < 1e-2


@pytest.mark.parametrize("method", ["l2", "l1"])
@pytest.mark.parametrize("family,variant", [("cnn", "bn_maxpool_conv1x1"), ("cnn", "conv3x3"), ("mlp", "gemm_relu"), ("mlp", "matmul_add_erf_gelu")])
def test_magnitude_without_recovery_is_worse(family: str, variant: str, method: str) -> None:
    planted = _cnn(variant) if family == "cnn" else _mlp(variant)
    ratio = planted.total_removable / planted.total_units
    x = _fresh(planted)
    reference = run(planted.model, x)
    snp, snp_report = onnxprune.prune(planted.model, _calib(planted), ratio=ratio)
    base, base_report = onnxprune.prune(planted.model, _calib(planted), ratio=ratio, method=method)
    assert snp_report.units_after == base_report.units_after == planted.total_units - planted.total_removable
    snp_error, base_error = relative_l2(reference, run(snp, x)), relative_l2(reference, run(base, x))
    print(f"{family}/{variant}: snp {snp_error:.2e}, {method} {base_error:.2e}")
    assert snp_error < 1e-4
    assert base_error > 1e-2 and base_error > 100 * snp_error


def test_lsq_recovers_exactly_when_magnitude_picks_the_planted_units() -> None:
    """Copies scaled by 0.05 have the smallest weight norms (the dead/constant units have 0), so
    the magnitude order removes exactly the planted units and LS recovery makes it exact."""
    planted = planted_mlp(dup_scale=0.05)
    ratio = planted.total_removable / planted.total_units
    x = _fresh(planted)
    lsq, lsq_report = onnxprune.prune(planted.model, _calib(planted), ratio=ratio, method="lsq")
    _assert_exactly_planted_removed(planted, lsq, lsq_report)
    assert relative_l2(run(planted.model, x), run(lsq, x)) < 1e-4
    # the same units without recovery: the constant units' contribution is lost
    l2, l2_report = onnxprune.prune(planted.model, _calib(planted), ratio=ratio, method="l2")
    assert _kept_by_space(l2_report) == _kept_by_space(lsq_report)
    assert relative_l2(run(planted.model, x), run(l2, x)) > 1e-2


@pytest.mark.parametrize("build", [random_mlp, random_cnn], ids=["mlp", "cnn"])
def test_lsq_recovery_beats_no_recovery_on_random_weights(build) -> None:
    """lsq and l2 remove the same units (weight-magnitude order); only the recovery differs."""
    model = build(seed=3)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((300 if len(shape) == 1 else 48, *shape)).astype(np.float32)}
    x = rng.standard_normal((40, *shape)).astype(np.float32)
    errors = {}
    for method in ("lsq", "l2", "snp"):
        pruned, report = onnxprune.prune(model, calib, ratio=0.3, method=method)
        errors[method] = relative_l2(run(model, x), run(pruned, x))
        errors[method + "_kept"] = [row.kept for row in report.spaces]
    print(errors)
    assert errors["lsq_kept"] == errors["l2_kept"]
    assert errors["lsq"] < 0.85 * errors["l2"]  # a missing recovery gives 1.0
    assert errors["snp"] < errors["l2"]


def test_conv_tap_coverage_counts_the_outputs_each_tap_reads_inside() -> None:
    """Per tap, the share of outputs where it reads the input, not padding (explicit pads, SAME_UPPER)."""
    from onnx import helper

    from onnxprune.rules.conv_pool import conv_tap_coverage

    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    assert np.allclose(conv_tap_coverage(node, (1, 8, 1, 5)), np.outer([0, 1, 0], [0.8, 1, 0.8]))
    same = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3], strides=[2], auto_pad="SAME_UPPER")
    assert np.allclose(conv_tap_coverage(same, (1, 8, 4)), [1, 1, 0.5])  # outputs 0, 1 read -0+.., the last tap of 1 reads index 4
    assert conv_tap_coverage(node, (1, 8, None, 5)) is None
    bare = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])  # kernel_shape is optional: the weight's dims stand in
    assert np.allclose(conv_tap_coverage(bare, (1, 8, 1, 5), (3, 3)), np.outer([0, 1, 0], [0.8, 1, 0.8]))


def test_a_padded_conv_gets_only_the_recovery_constant_its_taps_read() -> None:
    """On an H = 1 map (an OCR neck) a 3x3 consumer's top and bottom rows read only padding: the
    recovery's constant must not reach them (every output got a wrong constant: relative L2 3.5
    where the units are exactly recoverable). The fold now gives what the same function written
    as a 1x3 conv gives."""
    from builders import GraphBuilder

    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(16, 4, 1, 1)).astype(np.float32), rng.uniform(1, 3, size=16).astype(np.float32)
    w2, b2 = rng.normal(size=(8, 16, 3, 3)).astype(np.float32) / 6, rng.normal(size=8).astype(np.float32)
    outputs = []
    x = rng.normal(size=(160, 4, 1, 24)).astype(np.float32)
    for kernel in ("3x3", "1x3"):
        g = GraphBuilder([1, 4, 1, 24])
        h = g.conv("x", w1, b1, name="expand")  # 16 units of rank 4 plus a constant: exactly recoverable
        if kernel == "3x3":
            y = g.conv(h, w2, b2, name="mix", pads=[1, 1, 1, 1])
        else:
            y = g.conv(h, np.ascontiguousarray(w2[:, :, 1:2]), b2, name="mix", pads=[0, 1, 0, 1])
        model = g.build(y, [None, 8, 1, 24])
        pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.5, sequential=False)
        assert {s.name: s.kept for s in report.spaces}["expand"] == 8
        outputs.append(relative_l2(run(model, x[:16]), run(pruned, x[:16])))
    assert abs(outputs[0] - outputs[1]) < 1e-5, outputs
