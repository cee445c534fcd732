"""Multi-query attention (Falcon's): one key and one value head, repeated for every query head
by repeat_kv (Unsqueeze -> Expand -> Reshape), written as a Gather by `onnxprune.gathers`. The
query heads are prunable; the shared key and value heads are locked (always kept)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.tidy import shapes_and_index

T, H, D = 6, 4, 4
E = 8


def falcon_attention() -> onnx.ModelProto:
    """x [N, T, E] -> fused qkv (E -> (H + 2) D) -> [N, T, H + 2, D]: heads 0..3 query, 4 key,
    5 value; query head 3 copies query head 1 (same weights: same output, removable exactly)."""
    rng = np.random.default_rng(2)
    g = GraphBuilder([None, T, E])
    w = rng.standard_normal((E, (H + 2) * D)).astype(np.float32)
    w[:, 3 * D:4 * D] = w[:, 1 * D:2 * D]
    heads = g.op("Reshape", [g.matmul("x", w, None, name="qkv"), g.const(np.array([0, 0, H + 2, D]), dtype=np.int64)])

    def part(start: int, stop: int) -> str:
        cut = g.op("Slice", [heads, *(g.const(np.array([v]), dtype=np.int64) for v in (start, stop, 2))])
        return g.op("Transpose", [cut], perm=[0, 2, 1, 3])  # [N, heads, T, D]

    def repeated(one: str) -> str:
        inserted = g.op("Unsqueeze", [one, g.const(np.array([2]), dtype=np.int64)])  # [N, 1, 1, T, D]
        expanded = g.op("Expand", [inserted, g.const(np.array([1, 1, H, 1, 1]), dtype=np.int64)])
        return g.op("Reshape", [expanded, g.const(np.array([0, H, -1, D]), dtype=np.int64)])

    q, k, v = part(0, H), repeated(part(H, H + 1)), repeated(part(H + 1, H + 2))
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    y = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, H * D]), dtype=np.int64)])
    return g.build(g.matmul(y, rng.standard_normal((H * D, 3)).astype(np.float32), None, name="dense"), ["N", T, 3])


def calibration(n: int = 64, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, T, E)).astype(np.float32)}


def test_query_heads_are_units_and_the_shared_key_and_value_are_locked() -> None:
    model = falcon_attention()
    _, index = shapes_and_index(model, {"x": (1, T, E)})
    qkv = next(s for s in analyse(model, index=index).spaces if s.name == "qkv")
    assert qkv.prunable and qkv.n == H + 2 and qkv.locked == {H, H + 1}, (qkv.pinned, qkv.locked)
    assert any("multi-query" in reason for reason in qkv.lock_reasons)


def test_the_copied_query_head_is_removed_exactly() -> None:
    model = falcon_attention()
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-6, order="pivoted", head_gain=1)
    row = next(s for s in report.spaces if s.name == "qkv")
    assert row.kept == H + 1 and row.locked == 2, report.spaces
    for batch in (1, 3):
        x = calibration(batch, seed=9)["x"]
        assert relative_l2(run(model, x), run(pruned, x)) < 1e-4


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_the_key_and_value_heads_and_one_query_head_survive_any_ratio(ratio) -> None:
    model = falcon_attention()
    pruned, report = onnxprune.prune(model, calibration(), ratio=ratio, allocation="uniform", head_gain=1)
    row = next(s for s in report.spaces if s.name == "qkv")
    assert 2 < row.kept < H + 2, report.spaces  # query heads went (one at least stays), key and value stayed
    assert run(pruned, calibration(3, seed=9)["x"]).shape == (3, T, 3)
    weight = next(t for t in pruned.graph.initializer if t.dims[-1] == row.kept * D and len(t.dims) == 2 and t.dims[0] == E)
    original = next(t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[-1] == (H + 2) * D)
    kept = onnx.numpy_helper.to_array(weight)
    assert np.array_equal(kept[:, -2 * D:], onnx.numpy_helper.to_array(original)[:, -2 * D:])  # key and value columns intact


def test_a_ratio_beyond_the_locked_units_says_so() -> None:
    with pytest.raises(onnxprune.TargetError, match="locked units"):
        onnxprune.prune(falcon_attention(), calibration(), ratio=0.9, allocation="uniform", head_gain=1)


def test_inspect_names_the_locked_units() -> None:
    report = onnxprune.inspect_model(falcon_attention(), {"x": (1, T, E)})
    qkv = next(s for s in report.spaces if s.name == "qkv")
    assert not qkv.pinned and qkv.locked == 2 and "multi-query" in qkv.lock_reasons[0]
