"""Grouped-query attention with one fused QKV projection (Phi-3's and Phi-4-mini's qkv_proj, as
TorchScript exports it: one MatMul, Slices of its last axis, repeat_kv on the key and value
parts; Falcon's query_key_value, viewed as [.., groups, members, head] and cut on the members
axis). The projection is written as one MatMul per part (`onnxprune.unfuse`), so the query
heads are units and the key and value heads are derived from them, as with separate q/k/v."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from builders import GraphBuilder, op_types, relative_l2, run, session, treat_as_large
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
    assert fused is not None and [(p.columns[0], p.columns[-1] + 1) for p in fused.parts] == [(0, 6), (6, 8), (8, 12)]
    unfuse_projections(model, index, [fused])
    assert [n.op_type for n in model.graph.node] == ["Gemm"] * 3 + ["Concat"] and len(model.graph.initializer) == 6
    onnx.checker.check_model(model, full_check=True)
    assert all(np.array_equal(a, b) for a, b in zip(before, run_all(model, x), strict=True))


def run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return session(model).run(None, {"x": x})


def shape_entry(g: GraphBuilder, x: str, axis: int) -> str:
    """Unsqueeze(Gather(Shape(x), axis)): TorchScript's x.size(axis) in a view target."""
    size = g.op("Gather", [g.op("Shape", [x]), g.const(np.array(axis), dtype=np.int64)], axis=0)
    return g.op("Unsqueeze", [size, g.const(np.array([0]), dtype=np.int64)])


def falcon_attention(kv: int = KV, bias: bool = False, copy: tuple[int, int] | None = (2, 3), silent: tuple[int, ...] = (),
                     fixed_lead: bool = False) -> onnx.ModelProto:
    """Falcon's new decoder architecture, as TorchScript exports it: x [N, T, E] -> query_key_value
    (E -> kv (H / kv + 2) D) -> view [N, T, -1, D] -> view [N, T, kv, H / kv + 2, D] -> queries
    [.., :-2, :] (a Slice, then a view [N, T, -1, D] from its own shape), key [.., -2, :] and value
    [.., -1, :] (Gathers) -> repeat_kv -> softmax attention -> dense. `copy` (source, copy): a
    query head copied in the same KV group; `silent`: query heads dense does not read;
    `fixed_lead`: the second view's target is the constant [1, -1, ..] (a traced batch of 1)."""
    rng = np.random.default_rng(5)
    members = H // kv + 2
    g = GraphBuilder([None, "T", E])
    w = rng.standard_normal((E, kv, members, D)).astype(np.float32)
    b = rng.standard_normal((kv, members, D)).astype(np.float32)
    if copy is not None:  # query head h is member h % (H / kv) of group h // (H / kv)
        (gs, ms), (gc, mc) = (divmod(h, H // kv) for h in copy)
        w[:, gc, mc], b[gc, mc] = w[:, gs, ms], b[gs, ms]
    qkv = g.op("MatMul", ["x", g.const(w.reshape(E, -1))], name="qkv")
    if bias:
        qkv = g.op("Add", [qkv, g.const(b.reshape(-1))], name="qkv_bias")
    batch, time = shape_entry(g, "x", 0), shape_entry(g, "x", 1)

    def ints(*values: int) -> str:
        return g.const(np.array(values), dtype=np.int64)

    heads = g.op("Reshape", [qkv, g.op("Concat", [batch, time, ints(-1, D)], axis=0)])
    grouped_target = ints(1, -1, kv, members, D) if fixed_lead else g.op("Concat", [batch, time, ints(kv, -1, D)], axis=0)
    grouped = g.op("Reshape", [heads, grouped_target])  # [N, T, kv, members, D]
    queries = g.op("Slice", [grouped, ints(0), ints(-2), ints(3), ints(1)])
    size = g.op("Shape", [queries])
    merged = g.op("Concat", [g.op("Slice", [size, ints(0), ints(-3), ints(0)]), ints(-1), g.op("Slice", [size, ints(4), ints(5), ints(0)])], axis=0)
    q = g.op("Transpose", [g.op("Reshape", [queries, merged])], perm=[0, 2, 1, 3])
    k, v = (g.op("Transpose", [g.op("Gather", [grouped, g.const(np.array(m), dtype=np.int64)], axis=3)], perm=[0, 2, 1, 3]) for m in (-2, -1))

    def repeated(one: str) -> str:
        inserted = g.op("Unsqueeze", [one, ints(2)])  # [N, kv, 1, T, D]
        expanded = g.op("Expand", [inserted, ints(1, 1, H // kv, 1, 1)])
        return g.op("Reshape", [expanded, ints(0, H, -1, D)])

    scores = g.op("MatMul", [q, g.op("Transpose", [repeated(k)], perm=[0, 1, 3, 2])])
    y = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), repeated(v)])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), ints(0, 0, H * D)])
    w_o = rng.standard_normal((H * D, 3)).astype(np.float32)
    for head in silent:
        w_o[head * D:(head + 1) * D] = 0
    return g.build(g.matmul(y, w_o, None, name="dense"), ["N", "T", 3])


def falcon_inputs(n: int, seed: int, time: int = T) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, time, E)).astype(np.float32)


def test_interleaved_query_key_value_is_written_as_parts() -> None:
    spaces = {s.name: s for s in onnxprune.inspect_model(falcon_attention(), {"x": (1, T, E)}).spaces}
    assert "qkv" not in spaces, spaces.get("qkv")  # before: one space, pinned ("Gathers ... both repeat these units")
    query, key, value = spaces["qkv_part0"], spaces["qkv_part1"], spaces["qkv_part2"]
    assert not query.pinned and query.units == H and query.derived_from is None, query
    assert (key.units, value.units) == (KV, KV) and not key.pinned and not value.pinned, (key, value)
    assert key.derived_from and value.derived_from and key.derived_from != value.derived_from
    # a view whose leading axes are not the projection's at every run is not un-fused: pinned as before
    fixed = {s.name: s for s in onnxprune.inspect_model(falcon_attention(fixed_lead=True), {"x": (1, T, E)}).spaces}
    assert fixed["qkv"].pinned and not any(name.startswith("qkv_part") for name in fixed)


@pytest.mark.parametrize("bias", [False, True])
def test_interleaved_parts_compute_the_same_outputs(bias: bool) -> None:
    model = falcon_attention(bias=bias)
    unfused = onnx.ModelProto()
    unfused.CopyFrom(model)
    index = GraphIndex(unfused, static_shapes(unfused, {"x": (1, T, E)}))
    fused = fused_projection(index, index.node("qkv"))
    members = H // KV + 2
    assert fused is not None and [len(p.columns) for p in fused.parts] == [H * D, KV * D, KV * D]
    assert np.array_equal(fused.parts[1].columns.reshape(KV, D) // D, [[g * members + members - 2] * D for g in range(KV)])  # each group's key head
    unfuse_projections(unfused, index, [fused])
    onnx.checker.check_model(unfused, full_check=True)
    assert op_types(unfused).count("MatMul") == 3 + 3 and "Slice" not in op_types(unfused)  # the parts, scores, probs @ V, dense
    assert not any(n.op_type == "Gather" and n.input[0].startswith("reshape") for n in unfused.graph.node)
    for batch, time in ((1, T), (3, T), (2, 9)):
        x = falcon_inputs(batch, 9, time)
        assert np.array_equal(run(model, x), run(unfused, x))


def test_interleaved_copied_query_head_and_silent_group_are_removed_exactly() -> None:
    model = falcon_attention()
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-6, order="pivoted", head_gain=1)
    found = rows(report)
    assert found["qkv_part0"] == (H, H - 1) and found["qkv_part1"] == (KV, KV) and found["qkv_part2"] == (KV, KV), report.spaces
    for batch, time in ((1, T), (3, 9)):
        x = falcon_inputs(batch, 9, time)
        assert relative_l2(run(model, x), run(pruned, x)) < 1e-4
    model = falcon_attention(copy=None, silent=(2, 3), bias=True)
    pruned, report = onnxprune.prune(model, calibration(), tolerance=1e-5)
    found = rows(report)
    assert found["qkv_part0"] == (H, H - 2) and found["qkv_part1"] == (KV, KV - 1) and found["qkv_part2"] == (KV, KV - 1), report.spaces
    assert sorted(t.dims[1] for t in part_weights(pruned)) == [(KV - 1) * D, (KV - 1) * D, (H - 2) * D]
    x = falcon_inputs(3, 9, 9)
    assert relative_l2(run(model, x), run(pruned, x)) < 1e-4
