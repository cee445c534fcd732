"""Computed shape entries (issue 14): TorchScript builds Reshape/Expand targets from Shape ->
Gather -> Unsqueeze -> Concat (nanoGPT's y.transpose(1, 2).contiguous().view(B, T, C), Llama's
repeat_kv). An entry that carries a pruned unit count is rewritten as a constant instead of
pinning the heads; a unit-axis size that reaches any other entry still pins."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.graph import GraphIndex, static_shapes

RNG = np.random.default_rng(23)
T, C, H = 6, 16, 4
D = C // H


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def ints(g: GraphBuilder, *values) -> str:
    return g.const(np.array(values), dtype=np.int64)


def scalar(g: GraphBuilder, value) -> str:
    return g.const(np.array(value), dtype=np.int64)


def entry(g: GraphBuilder, value: str) -> str:
    """TorchScript's Unsqueeze(size, [0]) of one shape entry."""
    return g.op("Unsqueeze", [value, ints(g, 0)])


def nanogpt_attention(plant: bool = True) -> onnx.ModelProto:
    """nanoGPT's CausalSelfAttention as TorchScript exports it: B, T, C = x.size(); fused c_attn
    split in q, k, v; view(B, T, n_head, C // n_head) with the sizes read from Shape(x); the
    scale 1/sqrt(k.size(-1)); the causal bias sliced to T; view(B, T, C) of the heads; c_proj.
    With `plant`, head 3 of q, k and v is a copy of head 1."""
    g = GraphBuilder([1, T, C])
    size = {axis: g.op("Gather", [g.op("Shape", ["x"]), scalar(g, axis)], axis=0) for axis in range(3)}
    w, b = normal(C, 3 * C), normal(3 * C)
    if plant:
        for part in range(3):
            w[:, part * C + 3 * D:part * C + 4 * D], b[part * C + 3 * D:part * C + 4 * D] = (
                w[:, part * C + D:part * C + 2 * D], b[part * C + D:part * C + 2 * D])
    qkv = g.matmul("x", w, b, name="c_attn")
    g.nodes.append(onnx.helper.make_node("Split", [qkv, ints(g, C, C, C)], ["q", "k", "v"], name="split", axis=2))
    heads = {}
    for t in ("q", "k", "v"):
        d = g.op("Div", [size[2], scalar(g, H)])
        target = g.op("Concat", [entry(g, size[0]), entry(g, size[1]), ints(g, H), entry(g, d)], axis=0)
        heads[t] = g.op("Transpose", [g.op("Reshape", [t, target], name=f"view_{t}")], perm=[0, 2, 1, 3])
    att = g.op("MatMul", [heads["q"], g.op("Transpose", [heads["k"]], perm=[0, 1, 3, 2])])
    dk = g.op("Cast", [g.op("Gather", [g.op("Shape", [heads["k"]]), scalar(g, 3)], axis=0)], to=onnx.TensorProto.FLOAT)
    att = g.op("Mul", [att, g.op("Div", [g.const(np.float32(1.0)), g.op("Sqrt", [dk])])])
    ends = g.op("Concat", [entry(g, size[1]), entry(g, size[1])], axis=0)
    bias = g.op("Slice", [g.const(np.tril(np.ones((1, 1, 8, 8), np.float32))), ints(g, 0, 0), ends, ints(g, 2, 3)])
    att = g.op("Where", [g.op("Equal", [bias, g.const(np.float32(0.0))]), g.const(np.float32(-np.inf)), att])
    y = g.op("Transpose", [g.op("MatMul", [g.op("Softmax", [att], axis=-1), heads["v"]])], perm=[0, 2, 1, 3])
    target = g.op("Concat", [entry(g, size[0]), entry(g, size[1]), entry(g, size[2])], axis=0)
    y = g.op("Reshape", [y, target], name="view_y")
    return g.build(g.matmul(y, normal(C, C), normal(C), name="c_proj"), ["N", T, C])


def spaces_of(model: onnx.ModelProto):
    index = GraphIndex(model, static_shapes(model, {"x": (1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:])}))
    return analyse(model, index=index).spaces


def test_torchscript_heads_are_one_space_and_the_computed_view_entry_is_rewritten():
    space = next(s for s in spaces_of(nanogpt_attention()) if s.name == "c_attn")
    assert not space.pinned, space.pinned
    assert space.n == H
    computed = [u for u in space.reshapes if u.via == "view_y"]
    assert [(u.position, u.block) for u in computed] == [(0, D)], "entry C of view(B, T, C) is rewritten"


def test_a_planted_duplicate_head_of_torchscript_attention_is_removed_exactly():
    model = nanogpt_attention()
    x = RNG.normal(size=(96, T, C)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "c_attn")
    assert (row.kept, row.units) == (H - 1, H)
    assert initializer(pruned, "c_attn", 1).shape == (C, 3 * (C - D))
    assert initializer(pruned, "c_proj", 1).shape == (C - D, C)
    fresh = RNG.normal(size=(5, T, C)).astype(np.float32)  # another batch size: B and T stay computed
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def size_into_another_tensor() -> onnx.ModelProto:
    """fc1's output width read by Shape sets a Reshape entry of x, which carries no unit: pruning
    fc1 would change that Reshape, so the space pins."""
    g = GraphBuilder([1, 4, 8])
    h = g.op("Relu", [g.matmul("x", normal(8, 8), normal(8), name="fc1")])
    width = g.op("Gather", [g.op("Shape", [h]), scalar(g, 2)], axis=0)
    batch = g.op("Gather", [g.op("Shape", ["x"]), scalar(g, 0)], axis=0)
    folded = g.op("Reshape", ["x", g.op("Concat", [entry(g, batch), entry(g, width), ints(g, -1)], axis=0)])
    out = g.matmul(h, normal(8, 3), name="fc2")
    side = g.op("ReduceSum", [folded, ints(g, 1, 2)], keepdims=0)
    return g.build(g.op("Add", [out, g.op("Unsqueeze", [g.op("Unsqueeze", [side, ints(g, 1)]), ints(g, 2)])]), ["N", 4, 3])


def test_an_axis_size_read_into_an_entry_that_carries_no_unit_pins():
    space = next(s for s in spaces_of(size_into_another_tensor()) if s.name == "fc1")
    assert any("reads the size of the units' axis" in r for r in space.pinned), space.pinned


@pytest.mark.parametrize("name", ["llama_tiny", "llama_tiny_kv"])
def test_torchscript_llama_prunes_kv_groups_like_its_torch_export_twin(name):
    found = {}
    for exporter in ("ts", "dynamo"):
        report = onnxprune.inspect_model(f"models/transformers/{name}.{exporter}.onnx")
        found[exporter] = sorted((s.units, len(s.producers), s.derived_from is not None) for s in report.spaces if not s.pinned)
    assert found["ts"] == found["dynamo"]
    assert found["ts"].count((4, 1, False)) == 2, "one space of 4 query heads per layer"
    assert found["ts"].count((2, 1, True)) == 4, "per layer, the 2 KV heads of k and of v go with their query heads"


def flatten2_tokens(shape_of: str = "self") -> onnx.ModelProto:
    """A ViT/SegFormer patch embedding as TorchScript exports x.flatten(2): Conv(3->8) ->
    Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1])) -> Transpose to tokens -> MatMul(8->5).
    Channel 6 is 2 x channel 2. `shape_of="relu"` flattens Relu(x) with the sizes of x (the
    same units); `"other"` with the sizes of another Conv of as many channels (other units)."""
    g = GraphBuilder([None, 3, 4, 4])
    w, b = normal(8, 3, 3, 3), normal(8)
    w[6], b[6] = 2 * w[2], 2 * b[2]
    y = g.conv("x", w, b, name="patch", pads=[1, 1, 1, 1])
    z = y if shape_of == "self" else g.op("Relu", [y])
    sized = g.conv("x", normal(8, 3, 3, 3), normal(8), name="other", pads=[1, 1, 1, 1]) if shape_of == "other" else y
    sizes = g.op("Slice", [g.op("Shape", [sized]), ints(g, 0), ints(g, 2)])
    flat = g.op("Reshape", [z, g.op("Concat", [sizes, ints(g, -1)], axis=0)], name="flatten2")
    tokens = g.op("Transpose", [flat], perm=[0, 2, 1])
    out = g.matmul(tokens, normal(8, 5), normal(5), name="proj")
    if shape_of == "other":  # the other Conv's channels reach the output through their own MatMul
        other = g.op("Transpose", [g.op("Reshape", [sized, ints(g, 0, 8, -1)])], perm=[0, 2, 1])
        out = g.op("Add", [out, g.matmul(other, normal(8, 5), normal(5), name="other_proj")])
    return g.build(out, ["N", 16, 5])


@pytest.mark.parametrize("shape_of", ["self", "relu"])
def test_a_flatten2_target_read_from_a_tensor_with_the_same_units_follows_the_pruning(shape_of: str) -> None:
    model = flatten2_tokens(shape_of)
    x = RNG.normal(size=(40, 3, 4, 4)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert next(s for s in report.spaces if s.name == "patch").kept == 7, report.spaces
    assert initializer(pruned, "patch", 1).shape[0] == 7
    assert relative_l2(run(model, x[:6]), run(pruned, x[:6])) < 1e-4


def test_a_flatten2_target_read_from_a_tensor_of_other_units_pins() -> None:
    """The sizes of another space's tensor would not follow this space's pruning."""
    model = flatten2_tokens("other")
    index = GraphIndex(model, static_shapes(model, {"x": (2, 3, 4, 4)}))
    patch = next(s for s in analyse(model, index=index).spaces if s.name == "patch")
    assert any("flatten2" in reason and "does not carry these units" in reason for reason in patch.pinned), patch.pinned


def partial_rotary_attention() -> onnx.ModelProto:
    """Phi's partial rotary embedding: q and k (separate projections, [1, T, H, D] -> [1, H, T, D])
    are cut along the head dimension, the first half rotated (a constant per-position Mul stands
    in for cos/sin) and joined back with Concat; head 3 of q, k and v copies head 1."""
    g = GraphBuilder([1, T, C])
    heads = {}
    for t in ("q", "k", "v"):
        w, b = normal(C, C), normal(C)
        w[:, 3 * D:], b[3 * D:] = w[:, D:2 * D], b[D:2 * D]
        h = g.op("Transpose", [g.op("Reshape", [g.matmul("x", w, b, name=f"{t}_proj"), ints(g, 1, T, H, D)])], perm=[0, 2, 1, 3])
        if t != "v":
            rot = g.op("Slice", [h, ints(g, 0), ints(g, D // 2), ints(g, 3)])
            rest = g.op("Slice", [h, ints(g, D // 2), ints(g, D), ints(g, 3)])
            h = g.op("Concat", [g.op("Mul", [rot, g.const(normal(T, D // 2))]), rest], axis=3)
        heads[t] = h
    att = g.op("Softmax", [g.op("MatMul", [heads["q"], g.op("Transpose", [heads["k"]], perm=[0, 1, 3, 2])])], axis=-1)
    y = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [att, heads["v"]])], perm=[0, 2, 1, 3]), ints(g, 1, T, C)])
    return g.build(g.matmul(y, normal(C, C), normal(C), name="o_proj"), [1, T, C])


def test_partial_rotary_heads_are_one_space_and_a_copy_goes() -> None:
    """k's head dimension is cut and joined again: reached backwards through q kᵀ, the Slices of
    another axis carry the heads, so q, k and v stay one space of heads."""
    model = partial_rotary_attention()
    space = next(s for s in spaces_of(model) if s.name == "q_proj")
    assert not space.pinned and set(space.producers) == {"q_proj", "k_proj", "v_proj"}, (space.pinned, space.producers)
    x = RNG.normal(size=(96, T, C)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, batch_size=1)
    assert next(r for r in report.spaces if r.name == "q_proj").kept == H - 1
    assert relative_l2(run(model, x[:1]), run(pruned, x[:1])) < 1e-4


def unbind_qkv_attention(unbind: str = "gather") -> onnx.ModelProto:
    """timm's / torchvision Swin's attention: one qkv projection reshaped to [1, T, 3, H, D],
    moved to [3, 1, H, T, D] and unbound with a Gather per part (`unbind="slice"`: a Slice of one
    part and a Squeeze, as paddle2onnx writes qkv[0]); head 3 copies head 1 in q, k, v."""
    g = GraphBuilder([1, T, C])
    w, b = normal(C, 3 * C), normal(3 * C)
    for part in range(3):
        w[:, part * C + 3 * D:part * C + 4 * D], b[part * C + 3 * D:part * C + 4 * D] = (
            w[:, part * C + D:part * C + 2 * D], b[part * C + D:part * C + 2 * D])
    qkv = g.op("Reshape", [g.matmul("x", w, b, name="qkv"), ints(g, 1, T, 3, H, D)], name="split_parts")
    qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
    if unbind == "gather":
        q, k, v = (g.op("Gather", [qkv, scalar(g, i)], axis=0) for i in range(3))
    else:
        q, k, v = (g.op("Squeeze", [g.op("Slice", [qkv, ints(g, i), ints(g, i + 1), ints(g, 0)]), ints(g, 0)]) for i in range(3))
    att = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    y = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3]), ints(g, 1, T, C)])
    return g.build(g.matmul(y, normal(C, C), normal(C), name="proj"), [1, T, C])


@pytest.mark.parametrize("unbind", ["gather", "slice"])
def test_heads_of_a_qkv_unbound_by_gather_are_one_space_and_a_copy_goes(unbind: str) -> None:
    """[.., 3E] -> [.., 3, H, D]: the units become heads, head h of q, k and v one unit (the
    parts land on the same positions of the H axis), and the planted copy is removed exactly."""
    model = unbind_qkv_attention(unbind)
    space = next(s for s in spaces_of(model) if s.name == "qkv")
    assert not space.pinned and space.n == H, (space.pinned, space.n)
    x = RNG.normal(size=(96, T, C)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, batch_size=1)
    assert next(r for r in report.spaces if r.name == "qkv").kept == H - 1
    assert initializer(pruned, "qkv", 1).shape == (C, 3 * (C - D))
    assert relative_l2(run(model, x[:1]), run(pruned, x[:1])) < 1e-4


def test_interpolate_to_a_size_read_from_its_own_input_carries_the_channels() -> None:
    """DeepLab's ASPP pooling branch by TorchScript: Resize(y, sizes=Concat(Shape(y)[0:2], [H, W]))
    reads y's own channel count, which follows the pruning: the branch conv is prunable (it was
    pinned for computed sizes) and the pruned model's outputs match."""
    from onnx import helper

    rng = np.random.default_rng(3)

    def const(name, value):
        return onnx.numpy_helper.from_array(np.asarray(value), name)
    inits = [const("w1", rng.standard_normal((12, 3, 3, 3)).astype(np.float32) / 5), const("b1", np.zeros(12, np.float32)),
             const("wp", rng.standard_normal((8, 12, 1, 1)).astype(np.float32) / 3), const("bp", np.full(8, 0.1, np.float32)),
             const("wo", rng.standard_normal((4, 20, 1, 1)).astype(np.float32) / 4), const("bo", np.zeros(4, np.float32)),
             const("lo", np.array([0], np.int64)), const("hi", np.array([2], np.int64)), const("hw", np.array([8, 8], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["a"], name="relu1"),
             helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
             helper.make_node("Conv", ["g", "wp", "bp"], ["cp"], name="pool_conv"),
             helper.make_node("Relu", ["cp"], ["y"], name="relu2"),
             helper.make_node("Shape", ["y"], ["shape"], name="shape"),
             helper.make_node("Slice", ["shape", "lo", "hi"], ["nc"], name="slice"),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], name="sizes", axis=0),
             helper.make_node("Resize", ["y", "", "", "sizes"], ["up"], name="resize", mode="linear"),
             helper.make_node("Concat", ["a", "up"], ["cat"], name="cat", axis=1),
             helper.make_node("Conv", ["cat", "wo", "bo"], ["out"], name="proj")]
    graph = helper.make_graph(nodes, "aspp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spaces = {s.name: s for s in onnxprune.inspect_model(model).spaces}
    assert not spaces["pool_conv"].pinned, spaces["pool_conv"].pinned
    x = rng.standard_normal((160, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.4, seed=0, allocation="uniform")
    assert {s.name: s.kept for s in report.spaces}["pool_conv"] < 8
    fresh = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    assert run(pruned, fresh).shape == (8, 4, 8, 8) and relative_l2(run(model, fresh), run(pruned, fresh)) < 0.5


def expand_guard_pooling() -> onnx.ModelProto:
    """DeepLab's image-pooling branch as TorchScript writes `p.expand(-1, -1, h, w)`: the target
    Concat([-1], [-1], h, w) behind the guard Where(Equal(t, -1), 1, t); the pooled 1x1 conv's
    8 units reach the Expand on the channel entry -1 (unit 7 a planted copy of unit 3)."""
    g = GraphBuilder([None, 3, 6, 6])
    y = g.op("Relu", [g.conv("x", normal(16, 3, 3, 3), normal(16), pads=[1, 1, 1, 1])])
    w_pool, b_pool = normal(8, 16, 1, 1), normal(8)
    w_pool[7], b_pool[7] = w_pool[3], b_pool[3]
    p = g.op("Relu", [g.conv(g.op("GlobalAveragePool", [y]), w_pool, b_pool, name="pool")])
    shape = g.op("Shape", [y])
    h, w = (g.op("Unsqueeze", [g.op("Gather", [shape, scalar(g, axis)], axis=0), ints(g, 0)]) for axis in (2, 3))
    target = g.op("Reshape", [g.op("Concat", [ints(g, -1), ints(g, -1), h, w], axis=0), ints(g, -1)])
    ones = g.op("ConstantOfShape", [g.op("Shape", [target])], value=onnx.numpy_helper.from_array(np.array([1], dtype=np.int64)))
    guard = g.op("Where", [g.op("Equal", [target, g.op("Mul", [ones, scalar(g, -1)])]), ones, target])
    branches = g.op("Concat", [g.op("Relu", [g.conv(y, normal(8, 16, 1, 1), normal(8))]), g.op("Expand", [p, guard])], axis=1)
    return g.build(g.conv(branches, normal(4, 16, 1, 1), normal(4)), ["N", 4, 6, 6])


def test_an_expand_guard_with_minus_one_on_the_units_entry_carries_them() -> None:
    """The channel entry -1 keeps the input's size whatever the pruning: nothing to rewrite, so
    the guard (pinned since it was found) no longer pins the pooled conv; its copy goes exactly."""
    model = expand_guard_pooling()
    x = RNG.normal(size=(48, 3, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    pool = next(s for s in report.spaces if s.name == "pool")
    assert not pool.pinned and pool.kept <= 7, pool  # the copy, and units the ReLU silences on these samples
    fresh = RNG.normal(size=(3, 3, 6, 6)).astype(np.float32)  # new samples, another batch
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5
