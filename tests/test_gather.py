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


def test_gather_permuting_the_units_axis_carries_them_and_selecting_pins() -> None:
    model = cls_pooled([7, 6, 5, 4, 3, 2, 1, 0], axis=2)  # reverses the units (a channel shuffle's kind)
    x = np.random.default_rng(6).standard_normal((64, T, 4)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted")
    assert next(s for s in report.spaces if s.name == "embed").kept == C - 1, report.spaces
    assert relative_l2(run(model, x[:8]), run(pruned, x[:8])) < 1e-4
    model = cls_pooled([0, 1, 2, 3, 4, 5, 6, 6], axis=2)  # picks unit 6 twice, drops unit 7
    index = GraphIndex(model, static_shapes(model, {"x": (2, T, 4)}))
    embed = next(s for s in analyse(model, index=index).spaces if s.name == "embed")
    assert any("not a permutation" in reason for reason in embed.pinned), embed.pinned


def relative_bias_attention(heads: int = 4, d: int = 2, folded: bool = False, table: str = "gather") -> onnx.ModelProto:
    """T5's relative attention bias: a constant table [buckets, heads] gathered by constant bucket
    ids [T, T], moved to [1, heads, T, T] and added to q kᵀ. Head 3 copies head 1 in q, k, v and
    in the table's column. `folded`: the exporter already gathered it (torch.export's Swin: a
    constant [T x T, heads] reshaped to [T, T, heads]). `table`: "gather_nd" looks the constant
    table up with GatherND, "mlp" computes it with a small MLP from constant coordinates and
    looks it up with GatherND (torch.export's Swin-v2: its continuous position bias), both with
    a dynamic batch."""
    rng = np.random.default_rng(8)
    width, batch = heads * d, 1 if table == "gather" else -1
    g = GraphBuilder([1, T, width])
    parts = {}
    for t in ("q", "k", "v"):
        w = rng.standard_normal((width, width)).astype(np.float32)
        w[:, 3 * d:4 * d] = w[:, d:2 * d]
        h = g.op("Reshape", [g.matmul("x", w, None, name=f"{t}_proj"), g.const(np.array([batch, T, heads, d]), dtype=np.int64)])
        parts[t] = g.op("Transpose", [h], perm=[0, 2, 1, 3])
    buckets = np.minimum(np.abs(np.arange(T)[:, None] - np.arange(T)[None, :]), 5)
    scores = g.op("MatMul", [parts["q"], g.op("Transpose", [parts["k"]], perm=[0, 1, 3, 2])])
    if table != "gather":
        bias = _looked_up_bias(g, rng, heads, buckets, computed=table == "mlp")
    elif folded:  # the target read at run time (T, T from the scores' shape), so nothing folds it
        sizes = g.op("Slice", [g.op("Shape", [scores]), g.const(np.array([2]), dtype=np.int64), g.const(np.array([4]), dtype=np.int64)])
        target = g.op("Concat", [sizes, g.const(np.array([heads]), dtype=np.int64)], axis=0)
        bias = g.op("Reshape", [g.const(_copied_column(rng.standard_normal((6, heads)))[buckets].reshape(T * T, heads)), target])
    else:
        bias = g.op("Gather", [g.const(_copied_column(rng.standard_normal((6, heads)))), g.const(buckets, dtype=np.int64)], name="bias_lookup", axis=0)
    bias = g.op("Unsqueeze", [g.op("Transpose", [bias], perm=[2, 0, 1]), g.const(np.array([0]), dtype=np.int64)])
    scores = g.op("Add", [scores, bias])
    y = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), parts["v"]])
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const(np.array([batch, T, width]), dtype=np.int64)])
    return g.build(g.matmul(y, rng.standard_normal((width, 3)).astype(np.float32), None, name="o_proj"), ["N" if batch < 0 else 1, T, 3])


def _copied_column(table: np.ndarray) -> np.ndarray:
    """The table with head 3's column a copy of head 1's."""
    table = table.astype(np.float32)
    table[:, 3] = table[:, 1]
    return table


def _looked_up_bias(g: GraphBuilder, rng: np.random.Generator, heads: int, buckets: np.ndarray, computed: bool) -> str:
    """GatherND of a [buckets, heads] table by constant ids [T x T, 1], reshaped to [T, T, heads];
    `computed`: the table is 16 sigmoid(MLP(coordinates)), its last MatMul writing the heads."""
    if computed:
        coords = g.const(rng.standard_normal((6, 2)))
        hidden = g.op("Relu", [g.matmul(coords, rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32), name="cpb_0")])
        table = g.matmul(hidden, _copied_column(rng.standard_normal((16, heads))), None, name="cpb_2")
    else:
        table = g.const(_copied_column(rng.standard_normal((6, heads))))
    picked = g.op("GatherND", [table, g.const(buckets.reshape(T * T, 1), dtype=np.int64)], name="bias_lookup")
    bias = g.op("Reshape", [picked, g.const(np.array([T, T, heads]), dtype=np.int64)])
    if computed:
        bias = g.op("Mul", [g.op("Sigmoid", [bias]), g.const(np.array(16.0))])
    return bias


@pytest.mark.parametrize("folded", [False, True])
def test_a_gathered_table_of_per_head_biases_is_sliced_with_the_heads(folded) -> None:
    model = relative_bias_attention(folded=folded)
    x = np.random.default_rng(9).standard_normal((64, T, 8)).astype(np.float32)  # the model's batch is 1
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", batch_size=1)
    assert next(s for s in report.spaces if s.name == "q_proj").kept == 3, report.spaces
    if not folded:  # (folded: an unsliced table would not broadcast against 3 heads in onnxruntime)
        assert [6, 3] in [list(t.dims) for t in pruned.graph.initializer], "the table lost the copied head's column"
    assert relative_l2(run(model, x[:1]), run(pruned, x[:1])) < 1e-4


@pytest.mark.parametrize("table", ["gather_nd", "mlp"])
def test_a_gather_nd_of_a_per_head_table_is_sliced_with_the_heads(table) -> None:
    """Swin-v2 (torch.export): the bias table's lookup is a GatherND of the positions' axis; a
    computed table's last MatMul becomes a producer of the heads, its columns sliced."""
    model = relative_bias_attention(table=table)
    x = np.random.default_rng(9).standard_normal((64, T, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted")
    space = next(s for s in report.spaces if s.name == "q_proj")
    assert space.kept == 3 and not space.pinned, report.spaces
    shapes = [list(t.dims) for t in pruned.graph.initializer]
    assert ([16, 3] if table == "mlp" else [6, 3]) in shapes, "the table (or its MatMul) lost the copied head's column"
    assert relative_l2(run(model, x[:3]), run(pruned, x[:3])) < 1e-5


def test_a_gather_nd_indexing_the_units_axis_pins() -> None:
    """GatherND whose indices pick along the units' axis (the heads) would select units: pins."""
    rng = np.random.default_rng(5)
    g = GraphBuilder([None, C])
    h = g.op("Relu", [g.matmul("x", rng.standard_normal((C, C)).astype(np.float32), None, name="embed")])
    picked = g.op("GatherND", [h, g.const(np.array([[0, 1], [0, 3]]), dtype=np.int64)], name="pick", batch_dims=0)
    model = g.build(g.matmul(g.op("Unsqueeze", [picked, g.const(np.array([0]), dtype=np.int64)]), rng.standard_normal((2, 3)).astype(np.float32), name="head"), [1, 3])
    index = GraphIndex(model, static_shapes(model, {"x": (2, C)}))
    embed = next(s for s in analyse(model, index=index).spaces if s.name == "embed")
    assert any("GatherND 'pick' indexes the units' axis" in reason for reason in embed.pinned), embed.pinned
