"""ShuffleNet's channel shuffle (Reshape [N, C] -> [N, g, C/g], Transpose, Reshape back) is
written as a Gather of the permuted channels (`onnxprune.tidy`), which carries the units of
every space on it: the blocks' outputs become prunable, with any count removed per block."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, op_types, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.gathers import moves_as_gathers
from onnxprune.graph import GraphIndex, static_shapes
from onnxprune.tidy import varied_index

C, HW = 8, 5


def shufflenet(computed_target: bool = False, groups: int = 2) -> onnx.ModelProto:
    """A stem conv, then two ShuffleNetV2 units: split the channels in halves, x1 passes, x2
    goes through 1x1 conv -> ReLU -> 1x1 conv -> ReLU ("b1", "b2"), Concat, shuffle. Channel 3
    of each unit's last conv copies its channel 1 (after the ReLU too): removable exactly.
    `computed_target`: the shuffle's Reshape targets read the batch size at run time
    (TorchScript's `x.view(batch, groups, -1, h, w)`)."""
    rng = np.random.default_rng(3)
    g = GraphBuilder([None, 4, HW, HW])
    def bias(n: int) -> np.ndarray:  # mostly positive: the ReLUs leave most units alive
        return rng.uniform(1.0, 2.0, n).astype(np.float32)

    x = g.op("Relu", [g.conv("x", rng.standard_normal((C, 4, 1, 1)).astype(np.float32), bias(C), name="stem")])
    half = C // 2
    for block in ("b1", "b2"):
        x1 = g.op("Split", [x, g.const(np.array([half, half]), dtype=np.int64)], axis=1)
        g.nodes[-1].output.append(x2 := f"{x1}_2")
        h = g.op("Relu", [g.conv(x2, rng.standard_normal((half, half, 1, 1)).astype(np.float32), bias(half), name=f"{block}_in")])
        w = np.abs(rng.standard_normal((half, half, 1, 1))).astype(np.float32)  # reads ReLU outputs: no dead unit
        shift = bias(half)
        w[3], shift[3] = w[2], shift[2]
        b = g.op("Relu", [g.conv(h, w, shift, name=f"{block}_out")])
        joined = g.op("Concat", [x1, b], axis=1)
        if computed_target:
            batch = g.op("Slice", [g.op("Shape", [joined]), g.const(np.array([0]), dtype=np.int64), g.const(np.array([1]), dtype=np.int64)])
            grouped = g.op("Concat", [batch, g.const(np.array([groups, C // groups, HW, HW]), dtype=np.int64)], axis=0)
            flat = g.op("Concat", [batch, g.const(np.array([C, HW, HW]), dtype=np.int64)], axis=0)
        else:
            grouped = g.const(np.array([-1, groups, C // groups, HW, HW]), dtype=np.int64)
            flat = g.const(np.array([-1, C, HW, HW]), dtype=np.int64)
        moved = g.op("Transpose", [g.op("Reshape", [joined, grouped])], perm=[0, 2, 1, 3, 4])
        x = g.op("Reshape", [moved, flat], name=f"{block}_shuffle")
    pooled = g.op("GlobalAveragePool", [g.conv(x, rng.standard_normal((6, C, 1, 1)).astype(np.float32), name="head")])
    return g.build(pooled, ["N", 6, 1, 1])


def calibration(n: int = 96, seed: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, HW, HW)).astype(np.float32)}


def test_the_shuffle_becomes_a_gather_of_the_same_permutation() -> None:
    model = shufflenet()
    x = calibration(3)["x"]
    index = GraphIndex(model, static_shapes(model, {"x": (1, 4, HW, HW)}))
    reference = run(model, x)
    assert moves_as_gathers(model, index, lambda: index)
    assert op_types(model).count("Gather") == 2
    assert np.array_equal(run(model, x), reference)


@pytest.mark.parametrize("computed_target", [False, True])
def test_a_copied_channel_is_removed_exactly_through_the_shuffles(computed_target) -> None:
    model = shufflenet(computed_target)
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-7, order="pivoted", sequential=False)
    kept = {s.name: s.kept for s in report.spaces}
    assert kept["b1_out"] < C // 2 and kept["b2_out"] < C // 2, report.spaces  # the copies (and units ReLU leaves dead)
    assert not [s for s in report.spaces if s.name.startswith("b") and s.pinned], report.spaces
    for batch in (1, 3):
        x = calibration(batch, seed=11)["x"]
        assert relative_l2(run(model, x), run(pruned, x)) < 1e-4


@pytest.mark.parametrize("groups", [2, 4])
def test_uneven_removals_per_group_run_and_ratio_zero_is_identical(groups) -> None:
    model = shufflenet(groups=groups)
    x = calibration(5, seed=12)["x"]
    pruned, report = onnxprune.prune(model, calibration(), ratio=0.4, allocation="global")
    counts = {s.name: s.kept for s in report.spaces if s.name in ("b1_out", "b2_out")}
    assert min(counts.values()) < C // 2, counts  # the blocks' outputs lose units
    y = run(pruned, x)
    assert y.shape == (5, 6, 1, 1) and relative_l2(run(model, x), y) < 0.5
    same, _ = onnxprune.prune(model, calibration(), ratio=0.0)
    assert np.array_equal(run(model, x), run(same, x))


def test_a_gather_that_selects_units_still_pins() -> None:
    rng = np.random.default_rng(5)
    g = GraphBuilder([None, 4, HW, HW])
    h = g.op("Relu", [g.conv("x", rng.standard_normal((C, 4, 1, 1)).astype(np.float32), name="stem")])
    picked = g.op("Gather", [h, g.const(np.array([0, 2, 4, 6]), dtype=np.int64)], axis=1)
    model = g.build(g.conv(picked, rng.standard_normal((3, 4, 1, 1)).astype(np.float32), name="head"), ["N", 3, HW, HW])
    index = GraphIndex(model, static_shapes(model, {"x": (1, 4, HW, HW)}))
    stem = next(s for s in analyse(model, index=index).spaces if s.name == "stem")
    assert any("not a permutation" in reason for reason in stem.pinned), stem.pinned


def test_a_shuffle_of_an_axis_that_follows_the_inputs_is_left_alone() -> None:
    """Interleaving the halves of a dynamic sequence axis: fixed indices would be wrong at
    another length, so the Reshapes stay."""
    g = GraphBuilder([None, "T", C])
    grouped = g.op("Reshape", ["x", g.const(np.array([0, 2, -1, C]), dtype=np.int64)])
    moved = g.op("Transpose", [grouped], perm=[0, 2, 1, 3])
    y = g.op("Reshape", [moved, g.const(np.array([0, -1, C]), dtype=np.int64)])
    model = g.build(g.matmul(y, np.ones((C, 3), np.float32)), ["N", "T", 3])
    index = GraphIndex(model, static_shapes(model, {"x": (1, 4, C)}))
    assert not moves_as_gathers(model, index, lambda: varied_index(model, {"x": (1, 4, C)}))
    assert "Gather" not in op_types(model)


def concat_of_two_convs() -> onnx.ModelProto:
    """conv_a (4 ch) and conv_b (4 ch) on the same input, Concat, ReLU, then a 1x1 head conv.
    conv_b's channel 2 is 0.1 x conv_a's channel 1 (its weights and bias scaled): redundant only
    with a unit of *another* space at the shared site, and the smallest weights of all."""
    rng = np.random.default_rng(8)
    g = GraphBuilder([None, 4, HW, HW])
    wa, wb = rng.standard_normal((4, 4, 1, 1)).astype(np.float32), rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    ba, bb = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    wb[2], bb[2] = 0.1 * wa[1], 0.1 * ba[1]
    joined = g.op("Concat", [g.conv("x", wa, ba, name="conv_a"), g.conv("x", wb, bb, name="conv_b")], axis=1)
    head = g.conv(g.op("Relu", [joined]), rng.standard_normal((3, 8, 1, 1)).astype(np.float32), name="head")
    return g.build(head, ["N", 3, HW, HW])


def test_a_shared_site_recovers_a_unit_from_another_spaces_channels() -> None:
    """Magnitude order with least-squares recovery (`lsq`) removes conv_b's scaled copy; only a
    fit over every channel left at the Concat (conv_a's too) predicts it exactly."""
    model = concat_of_two_convs()
    pruned, report = onnxprune.prune(model, calibration(), ratio=1 / 8, method="lsq", allocation="global", sequential=False)
    assert {s.name: s.kept for s in report.spaces if s.name.startswith("conv")} == {"conv_a": 4, "conv_b": 3}, report.spaces
    x = calibration(3, seed=13)["x"]
    assert relative_l2(run(model, x), run(pruned, x)) < 1e-4


def test_the_sequential_refit_of_a_shared_site_is_one_map_of_every_channel_left_there() -> None:
    """The refit maps all of the Concat's original channels from every channel the pruned model
    keeps there: one fit for the site (under its first space), and the cross-space copy restored."""
    model = concat_of_two_convs()
    pruned, report = onnxprune.prune(model, calibration(), ratio=1 / 8, method="lsq", allocation="global", sequential=True,
                                     shrinkage=0.0)
    site = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")  # the head conv reads the Concat through it
    rows = [row for row in report.sequential["sites"] if row["site"] == site]
    assert [row["space"] for row in rows] == ["conv_a"], report.sequential
    x = calibration(3, seed=13)["x"]
    assert relative_l2(run(model, x), run(pruned, x)) < 1e-4
