"""Gather along another axis than the units' (a CLS token x[:, 0], a time step) carries them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.graph import GraphIndex, static_shapes

T, C = 5, 8


def cls_pooled(index: list[int] | int, axis: int = 1) -> onnx.ModelProto:
    """x [N, T, 4] @ W (4 -> 8; unit 6 = 2 x unit 2) -> Relu -> Gather(axis, index) -> @ (8 -> 3)."""
    rng = np.random.default_rng(5)
    g = GraphBuilder([None, T, 4])
    w = rng.standard_normal((4, C)).astype(np.float32)
    w[:, 6] = 2 * w[:, 2]
    h = g.op("Relu", [g.matmul("x", w, np.zeros(C, np.float32), name="embed")])
    picked = g.op("Gather", [h, g.const(np.array(index), dtype=np.int64)], name="pick", axis=axis)
    out = g.matmul(picked, rng.standard_normal((C, 3)).astype(np.float32), name="head")
    shape = ["N", 3] if np.ndim(index) == 0 else ["N", len(index), 3] if axis == 1 else ["N", T, 3]
    return g.build(out, shape)


@pytest.mark.parametrize("index", [0, [0, 4]])
def test_a_token_picked_by_gather_keeps_the_units_and_the_copy_goes(index) -> None:
    model = cls_pooled(index)
    x = np.random.default_rng(6).standard_normal((64, T, 4)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted")
    assert next(s for s in report.spaces if s.name == "embed").kept == C - 1, report.spaces
    assert relative_l2(run(model, x[:8]), run(pruned, x[:8])) < 1e-4


def test_gather_along_the_units_axis_pins() -> None:
    model = cls_pooled([7, 6, 5, 4, 3, 2, 1, 0], axis=2)  # reverses the units
    index = GraphIndex(model, static_shapes(model, {"x": (2, T, 4)}))
    embed = next(s for s in analyse(model, index=index).spaces if s.name == "embed")
    assert any("selects along the units' axis" in reason for reason in embed.pinned), embed.pinned
