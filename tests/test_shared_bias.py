"""A position bias the same for every head, shared by several attention layers (Hugging Face T5's
cross-attention: `zeros(1, heads, q, k)` built once, plus the attention mask, added to the scores
of every decoder layer): each reader narrows it to one head, so the layers keep different heads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, relative_l2, run
from onnxprune.graph import GraphIndex, static_shapes
from onnxprune.placement import Placement
from onnxprune.rules import CARRY, Carry
from onnxprune.spaces import BroadcastUpdate

H, D, C = 4, 4, 16


def shared_bias_attention(bias: str, copies: dict[int, dict[int, int]]) -> onnx.ModelProto:
    """Two attention layers on x [N, T, C] whose scores [N, H, T, T] both add one bias [1, H, T, T]:
    `bias` "zeros" is ConstantOfShape(0) of Concat([1], [H], [T], [T]) with T read by Shape
    (TorchScript), "expand" an Expand of a scalar 0 plus a computed mask [N, 1, 1, T] (torch.export
    with a mask), "per_head" zeros times a per-head constant (information: the layers couple).
    `copies[layer]`: head -> the head it copies (in q, k and v, and in the per-head constant)."""
    rng = np.random.default_rng(21)
    g = GraphBuilder([None, "T", C])

    def ints(*values: int) -> str:
        return g.const(np.array(values, dtype=np.int64), "shape", dtype=np.int64)

    length = g.op("Shape", ["x"], start=1, end=2)
    target = g.op("Concat", [ints(1), ints(H), length, length], axis=0)
    if bias == "expand":
        mask = g.op("Unsqueeze", [g.op("ReduceMean", ["x"], axes=[2], keepdims=0), ints(1, 2)])  # [N, 1, 1, T]
        shared = g.op("Add", [g.op("Expand", [g.const(np.float32(0), "zero"), target]), mask])
    else:
        shared = g.op("ConstantOfShape", [target], value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    if bias == "per_head":
        scale = rng.normal(size=(1, H, 1, 1))
        for head, source in (pair for layer in copies.values() for pair in layer.items()):
            scale[0, head] = scale[0, source]
        shared = g.op("Mul", [shared, g.const(scale, "per_head")], name="scale")
    x = "x"
    for layer in range(2):
        weights = [rng.normal(size=(C, C)).astype(np.float32) / 3 for _ in range(3)]
        for head, source in copies.get(layer, {}).items():
            for w in weights:
                w[:, head * D:(head + 1) * D] = w[:, source * D:(source + 1) * D]
        q, k, v = (g.op("Transpose", [g.op("Reshape", [g.matmul(x, w, name=f"{part}_{layer}"), ints(0, 0, H, D)])], perm=[0, 2, 1, 3])
                   for part, w in zip("qkv", weights, strict=True))
        scores = g.op("Add", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), shared], name=f"bias_{layer}")
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), ints(0, 0, C)])
        x = g.op("Add", [x, g.matmul(merged, rng.normal(size=(C, C)).astype(np.float32) / 3, name=f"o_{layer}")])
    return g.build(g.matmul(x, rng.normal(size=(C, 8)).astype(np.float32) / 3, name="head"), ["N", "T", 8])


def head_spaces(report) -> list:
    return [s for s in report.spaces if s.name.startswith("q_")]


@pytest.mark.parametrize("bias", ["zeros", "expand"])
def test_heads_of_layers_sharing_a_uniform_bias_are_separate_spaces(bias: str) -> None:
    report = onnxprune.inspect_model(shared_bias_attention(bias, {}), {"x": (1, 6, C)})
    assert [(s.name, s.units, s.pinned) for s in head_spaces(report)] == [("q_0", H, []), ("q_1", H, [])]


@pytest.mark.parametrize("bias", ["zeros", "expand"])
def test_a_copied_head_goes_exactly_in_one_layer_while_the_other_keeps_all(bias: str) -> None:
    """Layer 0's head 3 copies head 1: it goes, and layer 0's Add reads the bias narrowed to one
    head (a Slice); layer 1 keeps its 4 heads and reads the bias whole."""
    model = shared_bias_attention(bias, {0: {3: 1}})
    x = np.random.default_rng(5).normal(size=(64, 6, C)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert [s.kept for s in head_spaces(report)] == [3, 4]
    onnx.checker.check_model(pruned, full_check=True)
    narrowed = [n for n in pruned.graph.node if n.op_type == "Slice"]
    assert len(narrowed) == 1 and narrowed[0].output[0] in next(n for n in pruned.graph.node if n.name == "bias_0").input
    for batch, length in ((1, 6), (3, 9), (2, 1)):
        fresh = np.random.default_rng(batch).normal(size=(batch, length, C)).astype(np.float32)
        assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5


def test_a_bias_that_differs_between_heads_couples_the_layers_and_is_sliced() -> None:
    """Zeros times a per-head constant carries information per head: the layers' heads are one
    space; the constant is sliced and the zeros under it narrowed, so planted copies go exactly."""
    model = shared_bias_attention("per_head", {0: {3: 1}, 1: {3: 1}})
    heads = [s for s in onnxprune.inspect_model(model, {"x": (1, 6, C)}).spaces if s.units == H]
    assert [(len(s.producers), s.pinned) for s in heads] == [(6, [])], [(s.name, s.pinned) for s in heads]
    x = np.random.default_rng(5).normal(size=(64, 6, C)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert [s.kept for s in head_spaces(report)] == [3]
    fresh = np.random.default_rng(2).normal(size=(3, 9, C)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5


def test_the_rule_narrows_a_uniform_input_unless_it_alone_sizes_an_output_reached_backwards() -> None:
    """Units arriving on the scores: the zeros input is narrowed (no Carry). Units coming back to
    `zeros + mask`, whose size on the axis only the zeros give: carried as before (the
    ConstantOfShape then pins), since a narrowed input would shrink that output to one head."""
    g = GraphBuilder([1, H, 3, 3])
    target = g.op("Concat", [g.const(np.array([1, H]), "shape", dtype=np.int64), g.op("Shape", ["x"], start=2)], axis=0)
    zeros = g.op("ConstantOfShape", [target], value=onnx.numpy_helper.from_array(np.zeros(1, np.float32)))
    masked = g.op("Add", [zeros, g.const(np.zeros((1, 1, 1, 3)), "mask")], name="masked")
    model = g.build(g.op("Add", ["x", masked], name="scores"), [1, H, 3, 3])
    index = GraphIndex(model, static_shapes(model, {"x": (1, H, 3, 3)}))
    heads = Placement.identity(1, H)
    scores, masked_node = index.node("scores"), index.node("masked")
    assert CARRY["Add"](index, scores, "x", heads)[0] == BroadcastUpdate("scores", 1, 1, scores.output[0])
    assert CARRY["Add"](index, masked_node, masked, heads)[0] == Carry(zeros, heads)
