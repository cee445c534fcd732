"""nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoderLayer): the packed in-projection
is unflattened into parts, unbound by Gather, and the heads are folded into the batch axis; its
heads are units (models/build_vit_mha.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import relative_l2, run
from onnxprune.analyse import _grouped_labels

MODELS = Path(__file__).resolve().parents[1] / "models" / "transformers"
CALIB = MODELS / "vit_mha_calib.npz"
EXPORTERS = ["ts", "dynamo"]


def images(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def head_spaces(report) -> list:
    return [s for s in report.spaces if s.units == 4]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_heads_and_mlp_neurons_of_every_layer_are_prunable(exporter: str) -> None:
    report = onnxprune.inspect_model(MODELS / f"vit_mha.{exporter}.onnx", {"images": (1, 3, 16, 16)})
    prunable = [s for s in report.spaces if not s.pinned]
    assert sorted(s.units for s in prunable) == [4, 4, 64, 64], [(s.name, s.units, s.pinned) for s in report.spaces]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_the_planted_duplicate_head_goes_exactly_and_the_batch_stays_free(exporter: str) -> None:
    """Head 3 of layer 0 copies head 1: its output block is recovered exactly in out_proj. The
    folded [S, B x H, d] view gets a -1 entry, so batches other than the analysis's 1 run."""
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, report = onnxprune.prune(path, CALIB, tolerance=1e-6, order="pivoted", sequential=False)
    kept = sorted(s.kept for s in head_spaces(report))
    assert kept == [3, 4], [(s.name, s.kept, s.units) for s in report.spaces]
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(path)
    for batch in (1, 3):
        x = images(batch)
        assert relative_l2(run(original, x), run(pruned, x)) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_half_the_units_removed_gives_a_smaller_model_that_runs_at_any_batch(exporter: str) -> None:
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, report = onnxprune.prune(path, CALIB, ratio=0.5, allocation="uniform", head_gain=1.0)
    assert all(s.kept == 2 for s in head_spaces(report)), [(s.name, s.kept) for s in report.spaces]
    assert report.params_after < report.params_before
    original = onnx.load(path)
    for batch in (1, 5):
        x = images(batch, seed=batch)
        before, after = run(original, x), run(pruned, x)
        assert after.shape == before.shape and np.isfinite(after).all()
        assert relative_l2(before, after) < 1.0


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ratio_0_is_bit_identical(exporter: str) -> None:
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, _ = onnxprune.prune(path, CALIB, ratio=0.0)
    x = images(3)
    assert np.array_equal(run(onnx.load(path), x), run(pruned, x))


def test_grouped_labels_coarsen_aliased_features_into_heads() -> None:
    """q, k and v features j are one unit (aliased); heads of 2 features group them by pairs."""
    assert _grouped_labels([0, 1, 2, 3] * 3, 2) == [0, 1] * 3
    assert _grouped_labels([0, 1, 2, 3, 1, 0, 2, 3], 2) is None  # a run that is not one whole group
    assert _grouped_labels([0, 1, 2], 2) is None


def bloom_attention(planted: bool) -> onnx.ModelProto:
    """Bloom's attention as TorchScript writes it: a fused projection viewed [N, T, H, 3, d] and
    unbound by Gather on the parts' axis (heads outermost), heads folded into the batch,
    view(N x H, T, d) with N x H = Mul(N, H), and merged back with N = size(0) / H. With
    `planted`, head 3 reads exactly what head 1 reads."""
    from builders import GraphBuilder

    rng = np.random.default_rng(11)
    t, h, d = 5, 4, 4
    c = h * d
    g = GraphBuilder([None, t, c])
    w, b = rng.normal(size=(c, 3 * c)).astype(np.float32) / 4, rng.normal(size=3 * c).astype(np.float32) / 4
    if planted:
        w[:, 3 * 3 * d:4 * 3 * d], b[3 * 3 * d:4 * 3 * d] = w[:, 3 * d:2 * 3 * d], b[3 * d:2 * 3 * d]

    def ints(*values: int) -> str:
        return g.const(np.array(values, dtype=np.int64), "shape", dtype=np.int64)

    def size(tensor: str, axis: int) -> str:
        return g.op("Gather", [g.op("Shape", [tensor]), g.const(np.array(axis, dtype=np.int64), "axis", dtype=np.int64)], axis=0)

    def vector(scalar: str) -> str:
        return g.op("Unsqueeze", [scalar, ints(0)])

    qkv = g.matmul("x", w, b, name="qkv")
    fused = g.op("Reshape", [qkv, g.op("Concat", [vector(size(qkv, 0)), vector(size(qkv, 1)), ints(h, 3, d)], axis=0)])
    folded = g.op("Concat", [vector(g.op("Mul", [size("x", 0), g.const(np.array(h, dtype=np.int64), "heads", dtype=np.int64)])), ints(-1, d)], axis=0)
    q, k, v = (g.op("Reshape", [g.op("Transpose", [g.op("Gather", [fused, g.const(np.array(part, dtype=np.int64), "part", dtype=np.int64)], axis=3)],
                                                        perm=[0, 2, 1, 3]), folded]) for part in range(3))
    scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
    context = g.op("MatMul", [scores, v])
    batch = vector(g.op("Div", [size(context, 0), g.const(np.array(h, dtype=np.int64), "heads", dtype=np.int64)]))
    merged = g.op("Reshape", [context, g.op("Concat", [batch, ints(h), vector(size(context, 1)), ints(d)], axis=0)])
    tokens = g.op("Reshape", [g.op("Transpose", [merged], perm=[0, 2, 1, 3]), g.op("Concat", [batch, ints(t, c)], axis=0)])
    return g.build(g.matmul(tokens, rng.normal(size=(c, c)).astype(np.float32) / 4, name="dense"), ["N", t, c])


def test_bloom_heads_folded_into_the_batch_are_units_and_a_copied_head_goes_exactly() -> None:
    """The Mul's head count and the Div's are rewritten with the kept heads (not frozen as a
    count for a batch of 1): the pruned model runs at any batch and loses only the copy."""
    model = bloom_attention(planted=True)
    heads = next(s for s in onnxprune.inspect_model(model, {"x": (1, 5, 16)}).spaces if s.name == "qkv")
    assert heads.units == 4 and not heads.pinned, heads.pinned
    x = np.random.default_rng(2).normal(size=(60, 5, 16)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert next(s for s in report.spaces if s.name == "qkv").kept == 3
    for batch in (1, 3):
        assert relative_l2(run(model, x[:batch]), run(pruned, x[:batch])) < 1e-4


def einsum_attention() -> onnx.ModelProto:
    """Attention written with Einsum (MaxViT, lucidrains-style code): 'bhid,bhjd->bhij' and
    'bhij,bhjd->bhid' between separate q/k/v projections viewed [N, H, T, d]; head 3 of q, k and
    v copies head 1."""
    from builders import GraphBuilder

    rng = np.random.default_rng(12)
    t, h, d = 5, 4, 4
    c = h * d
    g = GraphBuilder([None, t, c])
    heads = {}
    for part in ("q", "k", "v"):
        w, b = rng.normal(size=(c, c)).astype(np.float32) / 4, rng.normal(size=c).astype(np.float32) / 4
        w[:, 3 * d:], b[3 * d:] = w[:, d:2 * d], b[d:2 * d]
        view = g.op("Reshape", [g.matmul("x", w, b, name=f"{part}_proj"), g.const(np.array([0, t, h, d], dtype=np.int64), "shape", dtype=np.int64)])
        heads[part] = g.op("Transpose", [view], perm=[0, 2, 1, 3])
    scores = g.op("Softmax", [g.op("Einsum", [heads["q"], heads["k"]], equation="bhid,bhjd->bhij")], axis=-1)
    context = g.op("Transpose", [g.op("Einsum", [scores, heads["v"]], equation="bhij,bhjd->bhid")], perm=[0, 2, 1, 3])
    tokens = g.op("Reshape", [context, g.const(np.array([0, t, c], dtype=np.int64), "shape", dtype=np.int64)])
    return g.build(g.matmul(tokens, rng.normal(size=(c, c)).astype(np.float32) / 4, name="o_proj"), ["N", t, c])


def test_einsum_attention_heads_are_units_and_a_copied_head_goes_exactly() -> None:
    model = einsum_attention()
    heads = next(s for s in onnxprune.inspect_model(model, {"x": (1, 5, 16)}).spaces if s.name == "q_proj")
    assert heads.units == 4 and not heads.pinned and len(heads.producers) == 3, heads
    x = np.random.default_rng(3).normal(size=(60, 5, 16)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert next(s for s in report.spaces if s.name == "q_proj").kept == 3
    for batch in (1, 3):
        assert relative_l2(run(model, x[:batch]), run(pruned, x[:batch])) < 1e-4


def test_an_einsum_that_contracts_the_units_or_hides_them_in_an_ellipsis_pins_them() -> None:
    from onnxprune.graph import GraphIndex
    from onnxprune.placement import Placement
    from onnxprune.rules import CARRY

    model = einsum_attention()
    index = GraphIndex(model, shapes={})
    node = next(n for n in index.nodes if n.op_type == "Einsum")
    for equation, reason in (("bhid,bhjd->bij", "contracts the units' axis"), ("...id,...jd->...ij", "implicit or broadcast")):
        node.attribute[0].s = equation.encode()
        effects = CARRY["Einsum"](index, node, node.input[0], Placement.identity(1, 4))
        assert len(effects) == 1 and reason in effects[0].reason, effects


def chunked_attention() -> onnx.ModelProto:
    """A fused projection cut into q, k and v by three Slices before the head views (TorchScript's
    torch.chunk in MaxViT's attention): once the units are whole heads, each Slice keeps whole
    heads. Head 3 copies head 1 in q, k and v."""
    from builders import GraphBuilder

    rng = np.random.default_rng(13)
    t, h, d = 5, 4, 4
    c = h * d
    g = GraphBuilder([None, t, c])
    w, b = rng.normal(size=(c, 3 * c)).astype(np.float32) / 4, rng.normal(size=3 * c).astype(np.float32) / 4
    for part in range(3):
        w[:, part * c + 3 * d:part * c + 4 * d], b[part * c + 3 * d:part * c + 4 * d] = w[:, part * c + d:part * c + 2 * d], b[part * c + d:part * c + 2 * d]
    qkv = g.matmul("x", w, b, name="qkv")

    def ints(*values: int) -> str:
        return g.const(np.array(values, dtype=np.int64), "i", dtype=np.int64)

    q, k, v = (g.op("Transpose", [g.op("Reshape", [g.op("Slice", [qkv, ints(part * c), ints((part + 1) * c), ints(2)]), ints(0, t, h, d)])],
                    perm=[0, 2, 1, 3]) for part in range(3))
    scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    tokens = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [scores, v])], perm=[0, 2, 1, 3]), ints(0, t, c)])
    return g.build(g.matmul(tokens, rng.normal(size=(c, c)).astype(np.float32) / 4, name="o_proj"), ["N", t, c])


def test_slices_of_a_fused_projection_keep_whole_heads_and_a_copied_head_goes_exactly() -> None:
    model = chunked_attention()
    heads = next(s for s in onnxprune.inspect_model(model, {"x": (1, 5, 16)}).spaces if s.name == "qkv")
    assert heads.units == 4 and not heads.pinned, heads
    x = np.random.default_rng(4).normal(size=(60, 5, 16)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert next(s for s in report.spaces if s.name == "qkv").kept == 3
    for batch in (1, 3):
        assert relative_l2(run(model, x[:batch]), run(pruned, x[:batch])) < 1e-4


def dynamo_attention_layers(copies: dict[int, dict[int, int]]) -> onnx.ModelProto:
    """Two nn.MultiheadAttention layers as torch.export writes them with a dynamic sequence length
    (the exported graph's structure at a smaller size): batch x heads is computed once, Mul(N, H),
    and one Concat [T, N x H, d] built from it is the target of the q, k and v head views of BOTH
    layers; the other targets ([T, N, 3, C], [N, H, T, d], [T, N, C]) are shared Concats too.
    `copies[layer]`: head -> the head it copies (in q, k and v)."""
    from builders import GraphBuilder

    rng = np.random.default_rng(14)
    h, d = 4, 4
    c = h * d
    g = GraphBuilder([None, "T", c])

    def ints(*values: int) -> str:
        return g.const(np.array(values, dtype=np.int64), "shape", dtype=np.int64)

    batch, length = g.op("Shape", ["x"], start=0, end=1), g.op("Shape", ["x"], start=1, end=2)
    heads_in_batch = g.op("Reshape", [g.op("Mul", [g.op("Squeeze", [batch]), g.const(np.array(h), "heads", dtype=np.int64)]), ints(-1)])
    folded = g.op("Concat", [length, heads_in_batch, ints(d)], axis=0)  # the shared [T, N x H, d]
    packed = g.op("Concat", [length, batch, ints(3), ints(c)], axis=0)
    split = g.op("Concat", [batch, ints(h), length, ints(d)], axis=0)
    tokens = g.op("Concat", [length, batch, ints(c)], axis=0)
    flat = ints(-1, c)
    x = "x"
    for layer in range(2):
        w, b = rng.normal(size=(c, 3 * c)).astype(np.float32) / 4, rng.normal(size=3 * c).astype(np.float32) / 4
        for head, source in copies.get(layer, {}).items():
            for part in range(3):
                to, of = slice(part * c + head * d, part * c + (head + 1) * d), slice(part * c + source * d, part * c + (source + 1) * d)
                w[:, to], b[to] = w[:, of], b[of]
        qkv = g.matmul(g.op("Transpose", [x], perm=[1, 0, 2]), w, b, name=f"in_proj_{layer}")
        parts = g.op("Squeeze", [g.op("Transpose", [g.op("Unsqueeze", [g.op("Reshape", [qkv, packed]), ints(0)])], perm=[3, 1, 2, 0, 4]),
                                 ints(-2)])
        q, k, v = (g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [g.op("Gather", [parts, g.const(np.array(part), "part", dtype=np.int64)],
                                                                                 axis=0), folded])], perm=[1, 0, 2]), split])
                   for part in range(3))
        scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
        context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [scores, v])], perm=[2, 0, 1, 3]), flat])
        out = g.op("Gemm", [context, g.const(rng.normal(size=(c, c)) / 4, "w"), g.const(rng.normal(size=c) / 4, "b")], transB=1,
                   name=f"out_proj_{layer}")
        x = g.op("Add", [x, g.op("Transpose", [g.op("Reshape", [out, tokens])], perm=[1, 0, 2])])
    return g.build(g.matmul(x, rng.normal(size=(c, 8)).astype(np.float32) / 4, name="head"), ["N", "T", 8])


def test_dynamo_heads_of_layers_that_share_the_batch_x_heads_product_are_units_and_copies_go_exactly() -> None:
    """Each head view edits its own copy of the shared target down to the Mul's head count (it
    pinned both layers' heads: 'shape constant ... is shared with another space'): layer 0 loses
    its one copied head and layer 1 its two, and the pruned model runs at other batches and lengths."""
    model = dynamo_attention_layers({0: {3: 1}, 1: {2: 0, 3: 0}})
    heads = [s for s in onnxprune.inspect_model(model, {"x": (1, 6, 16)}).spaces if s.name.startswith("in_proj")]
    assert [(s.units, s.pinned) for s in heads] == [(4, []), (4, [])], [(s.name, s.pinned) for s in heads]
    x = np.random.default_rng(5).normal(size=(64, 6, 16)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6, order="pivoted", sequential=False)
    assert [s.kept for s in report.spaces if s.name.startswith("in_proj")] == [3, 2]
    onnx.checker.check_model(pruned, full_check=True)
    for batch, length in ((1, 6), (3, 9), (2, 1)):
        fresh = np.random.default_rng(batch).normal(size=(batch, length, 16)).astype(np.float32)
        assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4
