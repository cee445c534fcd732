"""Grouped-query attention with one fused QKV projection (Phi-3's and Phi-4-mini's qkv_proj, as
TorchScript exports it: one MatMul, Slices of its last axis, repeat_kv on the key and value
parts). The projection is written as one MatMul per part (`onnxprune.unfuse`), so the query
heads are units and the key and value heads are derived from them, as with separate q/k/v."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from builders import GraphBuilder, relative_l2, run, session, treat_as_large
from onnxprune.graph import GraphIndex, static_shapes
from onnxprune.unfuse import fused_projection, unfuse_projections

T, H, KV, D, E = 6, 4, 2, 4, 8
INT64_MAX = np.iinfo(np.int64).max


def gqa_attention(kv: int = KV, cut: str = "slice", bias: bool = False, fp16: bool = False, copy: tuple[int, int] | None = (2, 3),
                  silent: tuple[int, ...] = ()) -> onnx.ModelProto:
    """x [N, T, E] -> qkv (E -> (H + 2 kv) D) -> query, key, value parts on the last axis ->
    heads; the key and value heads repeated H / kv times (Unsqueeze, Expand, Reshape) -> softmax
    attention -> o_proj. `copy` (source, copy): a query head copied in the same KV group (removable
    exactly); `silent`: query heads that o_proj does not read."""
    rng = np.random.default_rng(5)
    g = GraphBuilder([None, T, E])
    w = rng.standard_normal((E, (H + 2 * kv) * D)).astype(np.float32)
    b = rng.standard_normal((H + 2 * kv) * D).astype(np.float32)
    if copy is not None:
        w[:, copy[1] * D:(copy[1] + 1) * D] = w[:, copy[0] * D:(copy[0] + 1) * D]
        b[copy[1] * D:(copy[1] + 1) * D] = b[copy[0] * D:(copy[0] + 1) * D]
    weight = g.const(w.astype(np.float16), dtype=np.float16) if fp16 else g.const(w)
    if fp16:
        weight = g.op("Cast", [weight], to=onnx.TensorProto.FLOAT)
    qkv = g.op("MatMul", ["x", weight], name="qkv")
    if bias:
        qkv = g.op("Add", [qkv, g.const(b)], name="qkv_bias")
    bounds = [0, H * D, (H + kv) * D, INT64_MAX]
    if cut == "split":
        parts = ["q_part", "k_part", "v_part"]
        g.nodes.append(helper.make_node("Split", [qkv, g.const(np.array([H * D, kv * D, kv * D]), dtype=np.int64)], parts, name="split", axis=-1))
    else:
        parts = [g.op("Slice", [qkv, *(g.const(np.array([v]), dtype=np.int64) for v in (start, stop, 2))]) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]

    def heads(part: str, count: int) -> str:
        return g.op("Transpose", [g.op("Reshape", [part, g.const(np.array([0, 0, count, D]), dtype=np.int64)])], perm=[0, 2, 1, 3])

    def repeated(one: str) -> str:
        inserted = g.op("Unsqueeze", [one, g.const(np.array([2]), dtype=np.int64)])  # [N, kv, 1, T, D]
        expanded = g.op("Expand", [inserted, g.const(np.array([1, 1, H // kv, 1, 1]), dtype=np.int64)])
        return g.op("Reshape", [expanded, g.const(np.array([0, H, -1, D]), dtype=np.int64)])

    q, k, v = heads(parts[0], H), heads(parts[1], kv), heads(parts[2], kv)
    if kv < H:
        k, v = repeated(k), repeated(v)
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    y = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([0, 0, H * D]), dtype=np.int64)])
    w_o = rng.standard_normal((H * D, 3)).astype(np.float32)
    for head in silent:
        w_o[head * D:(head + 1) * D] = 0
    return g.build(g.matmul(y, w_o, None, name="o_proj"), ["N", T, 3])


def calibration(n: int = 64, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, T, E)).astype(np.float32)}


def part_weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The weights of the projection's parts (named after the fused weight's)."""
    return [t for t in model.graph.initializer if "_part" in t.name and len(t.dims) == 2]


def rows(report) -> dict[str, tuple[int, int]]:
    """(units, kept) of every space, by name."""
    return {s.name: (s.units, s.kept) for s in report.spaces}


def test_query_heads_are_units_and_key_and_value_heads_derived() -> None:
    spaces = {s.name: s for s in onnxprune.inspect_model(gqa_attention(), {"x": (1, T, E)}).spaces}
    query, key, value = spaces["qkv_part0"], spaces["qkv_part1"], spaces["qkv_part2"]
    assert not query.pinned and query.units == H and query.derived_from is None, query
    assert (key.units, value.units) == (KV, KV) and not key.pinned and not value.pinned, (key, value)
    assert key.derived_from and value.derived_from and key.derived_from != value.derived_from
    # multi-head attention (Phi-3-mini) prunes as one space already: its projection stays fused
    fused = {s.name: s for s in onnxprune.inspect_model(gqa_attention(kv=H, copy=None), {"x": (1, T, E)}).spaces}
    assert "qkv" in fused and not fused["qkv"].pinned and not any(name.startswith("qkv_part") for name in fused)
    # a projection the user excludes stays as it is
    excluded = {s.name for s in onnxprune.inspect_model(gqa_attention(), {"x": (1, T, E)}, exclude=["qkv"]).spaces}
    assert "qkv" in excluded and not any(name.startswith("qkv_part") for name in excluded)


@pytest.mark.parametrize("cut, bias, large", [("slice", False, False), ("split", True, True)])
def test_a_copied_query_head_is_removed_exactly(cut: str, bias: bool, large: bool, monkeypatch) -> None:
    if large:  # the fused weight is read from the pipeline's weights file, its parts are new weights beside it
        treat_as_large(monkeypatch)
    model = gqa_attention(cut=cut, bias=bias)
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-6, order="pivoted", head_gain=1)
    found = rows(report)
    assert found["qkv_part0"] == (H, H - 1), report.spaces  # the copy went, its group's KV head stays
    assert found["qkv_part1"] == (KV, KV) and found["qkv_part2"] == (KV, KV)
    for batch in (1, 3):
        x = calibration(batch, seed=9)["x"]
        assert relative_l2(run(model, x), run(pruned, x)) < 1e-4


def test_a_silent_kv_group_takes_its_key_and_value_heads_with_it() -> None:
    model = gqa_attention(copy=None, silent=(2, 3))
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-5)
    found = rows(report)
    assert found["qkv_part0"] == (H, H - 2) and found["qkv_part1"] == (KV, KV - 1) and found["qkv_part2"] == (KV, KV - 1), report.spaces
    assert sorted(t.dims[1] for t in part_weights(pruned)) == [(KV - 1) * D, (KV - 1) * D, (H - 2) * D]
    x = calibration(3, seed=9)["x"]
    assert relative_l2(run(model, x), run(pruned, x)) < 1e-4


def test_ratio_0_is_bit_identical() -> None:
    model = gqa_attention(bias=True)
    pruned, report = onnxprune.prune(model, calibration(), ratio=0.0)
    assert "qkv_part0" in rows(report)  # written as parts
    x = calibration(3, seed=9)["x"]
    assert np.array_equal(run(model, x), run(pruned, x))


def test_parts_of_a_weight_stored_as_fp16_stay_fp16() -> None:
    model = gqa_attention(fp16=True)
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-6, order="pivoted", head_gain=1)
    assert rows(report)["qkv_part0"] == (H, H - 1)
    weights = part_weights(pruned)
    assert len(weights) == 3 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights), [(t.name, t.data_type) for t in weights]


def test_a_gemm_with_a_bias_cut_by_a_split_computes_the_same_parts() -> None:
    rng = np.random.default_rng(1)
    g = GraphBuilder([None, E])
    y = g.gemm("x", rng.standard_normal((12, E)).astype(np.float32), rng.standard_normal(12).astype(np.float32), name="fused", trans_b=1)
    g.nodes.append(helper.make_node("Split", [y, g.const(np.array([6, 2, 4]), dtype=np.int64)], ["a", "b", "c"], name="split", axis=1))
    model = g.build(g.op("Concat", ["c", "a", "b"], axis=1), ["N", 12])
    x = rng.standard_normal((5, E)).astype(np.float32)
    before = run_all(model, x)
    index = GraphIndex(model, static_shapes(model, {"x": (1, E)}))
    fused = fused_projection(index, index.node("fused"))
    assert fused is not None and [p[1:] for p in fused.parts] == [(0, 6), (6, 8), (8, 12)]
    unfuse_projections(model, index, [fused])
    assert [n.op_type for n in model.graph.node] == ["Gemm"] * 3 + ["Concat"] and len(model.graph.initializer) == 6
    onnx.checker.check_model(model, full_check=True)
    assert all(np.array_equal(a, b) for a, b in zip(before, run_all(model, x), strict=True))


def run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(model).run(None, {"x": x})
