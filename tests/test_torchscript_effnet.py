"""TorchScript's EfficientNet patterns (issue 14, item 3): TF-"same" padding whose pads are
computed at run time from the input's shape (Shape -> Gather -> arithmetic -> Concat, then
F.pad's layout -> Pad), and classifier heads written x.view(x.size(0), -1) (Shape -> Gather(0) ->
Unsqueeze -> Concat([N, -1]) -> Reshape -> Gemm). Both carry or consume the units like their
torch.export twins; pads on the units' axis, or read from its size, still pin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.graph import GraphIndex, static_shapes

RNG = np.random.default_rng(31)  # calibration and test inputs; each model has its own seed
CIN, C, HW = 3, 8, 9
DUP, ORIG = 5, 2  # channel DUP of conv1 is a copy of channel ORIG


class Weights:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape, scale=0.5):
        return (self.rng.normal(size=shape) * scale).astype(np.float32)


def ints(g: GraphBuilder, *values) -> str:
    return g.const(np.array(values), dtype=np.int64)


def scalar(g: GraphBuilder, value) -> str:
    return g.const(np.array(value), dtype=np.int64)


def unsqueeze(g: GraphBuilder, value: str) -> str:
    return g.op("Unsqueeze", [value, ints(g, 0)])


def planted_conv(g: GraphBuilder, x: str, normal: Weights, kernel: int = 1) -> str:
    w, b = normal(C, CIN, kernel, kernel), normal(C)
    w[DUP], b[DUP] = w[ORIG], b[ORIG]
    return g.op("Relu", [g.conv(x, w, b, name="conv1", pads=[kernel // 2] * 4)])


def same_pad(g: GraphBuilder, x: str, kernel: int, stride: int, extra: tuple[str, ...] = ()) -> str:
    """Conv2dDynamicSamePadding's F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) with
    pw, ph = max((ceil(i / s) - 1) * s + k - i, 0) read from x.size()[-2:], as TorchScript exports
    it: the list, zeros up to 2 x rank, Reshape [-1, 2], reversed rows, Transpose, Reshape [-1].
    `extra` appends entries to the F.pad list (they pad the channel axis)."""
    sizes = g.op("Slice", [g.op("Shape", [x]), ints(g, -2), ints(g, np.iinfo(np.int64).max), ints(g, 0)])
    pads = []
    for k in (1, 0):  # F.pad lists the last axis first
        i = g.op("Gather", [sizes, scalar(g, k)], axis=0)
        out = g.op("Cast", [g.op("Ceil", [g.op("Div", [g.op("Cast", [i], to=onnx.TensorProto.FLOAT), g.const(np.float32(stride))])])],
                   to=onnx.TensorProto.INT64)
        total = g.op("Sub", [g.op("Add", [g.op("Mul", [g.op("Sub", [out, scalar(g, 1)]), scalar(g, stride)]), scalar(g, kernel)]), i])
        total = g.op("Max", [total, scalar(g, 0)])
        half = g.op("Div", [total, scalar(g, 2)])
        pads += [unsqueeze(g, half), unsqueeze(g, g.op("Sub", [total, half]))]
    listed = g.op("Concat", [*pads, *extra], axis=0)
    missing = g.op("Sub", [g.op("Mul", [scalar(g, 4), scalar(g, 2)]), g.op("Gather", [g.op("Shape", [listed]), ints(g, 0)], axis=0)])
    zeros = g.op("ConstantOfShape", [missing], value=onnx.numpy_helper.from_array(np.zeros(1, np.int64)))
    pairs = g.op("Reshape", [g.op("Concat", [listed, zeros], axis=0), ints(g, -1, 2)])
    pairs = g.op("Slice", [pairs, ints(g, -1), ints(g, -np.iinfo(np.int64).max), ints(g, 0), ints(g, -1)])
    flat = g.op("Cast", [g.op("Reshape", [g.op("Transpose", [pairs], perm=[1, 0]), ints(g, -1)])], to=onnx.TensorProto.INT64)
    return g.op("Pad", [x, flat, g.const(np.float32(0.0))], name="same_pad", mode="constant")


def effnet_block(extra: str = "") -> onnx.ModelProto:
    """conv1 (planted duplicate) -> computed TF-"same" Pad -> depthwise 3x3 stride 2 -> conv2.
    extra="channel": the F.pad list also pads the channel axis; "size": a pad entry is computed
    from the channel count (C - C)."""
    normal = Weights(1)
    g = GraphBuilder([1, CIN, HW, HW])
    g.inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", CIN, "H", "W"])]
    h = planted_conv(g, "x", normal, kernel=3)
    entries: tuple[str, ...] = ()
    if extra == "channel":
        entries = (ints(g, 1, 1),)
    elif extra == "size":
        width = g.op("Gather", [g.op("Shape", [h]), scalar(g, 1)], axis=0)
        entries = (unsqueeze(g, g.op("Sub", [width, width])), ints(g, 0))
    p = same_pad(g, h, kernel=3, stride=2, extra=entries)
    wd, bd = normal(C, 1, 3, 3), normal(C)
    wd[DUP], bd[DUP] = wd[ORIG], bd[ORIG]
    d = g.op("Relu", [g.conv(p, wd, bd, name="dw", group=C, strides=[2, 2])])
    out = g.conv(d, normal(16, C, 1, 1), normal(16), name="conv2")
    return g.build(out, ["N", 16, "H2", "W2"])


def classifier(kind: str) -> onnx.ModelProto:
    """conv1 (planted duplicate) -> [GlobalAveragePool] -> view(x.size(0), ...) -> Gemm. kind:
    "pooled": view(inputs.size(0), -1) of the pooled map, the batch read from the graph input
    (EfficientNet's head); "pooled_size1": view(x.size(0), x.size(1)), the unit count read from
    Shape; "map": view(x.size(0), -1) of the whole C x H x W map."""
    normal = Weights(2)
    g = GraphBuilder([1, CIN, 3, 3])
    h = planted_conv(g, "x", normal, kernel=3)
    if kind.startswith("pooled"):
        h = g.op("GlobalAveragePool", [h])
    source = "x" if kind == "pooled" else h
    batch = unsqueeze(g, g.op("Gather", [g.op("Shape", [source]), scalar(g, 0)], axis=0))
    features = unsqueeze(g, g.op("Gather", [g.op("Shape", [h]), scalar(g, 1)], axis=0)) if kind == "pooled_size1" else unsqueeze(g, scalar(g, -1))
    flat = g.op("Reshape", [h, g.op("Concat", [batch, features], axis=0)], name="view")
    n_in = C if kind.startswith("pooled") else C * 9
    return g.build(g.gemm(flat, normal(3, n_in), normal(3), name="fc", trans_b=1), ["N", 3])


def removed_the_duplicate(model: onnx.ModelProto, pruned: onnx.ModelProto) -> bool:
    """conv1 kept one of the two equal filters and every other filter."""
    before, after = initializer(model, "conv1", 1), initializer(pruned, "conv1", 1)
    return len(after) == C - 1 and all(any(np.array_equal(k, f) for f in after) for k in before)


def spaces_of(model: onnx.ModelProto, hw: int = 3):
    index = GraphIndex(model, static_shapes(model, {"x": (1, CIN, hw, hw)}))
    return analyse(model, index=index).spaces


def test_a_computed_same_pad_carries_the_units():
    space = next(s for s in spaces_of(effnet_block(), HW) if s.name == "conv1")
    assert not space.pinned, space.pinned
    assert "same_pad" in space.pass_through


@pytest.mark.parametrize(("extra", "reason"), [("channel", "pads the units' axis"), ("size", "reads the size of the units' axis")])
def test_a_computed_pad_on_the_units_axis_still_pins(extra, reason):
    space = next(s for s in spaces_of(effnet_block(extra), HW) if s.name == "conv1")
    assert any(reason in r for r in space.pinned), space.pinned


def test_a_planted_duplicate_through_a_computed_same_pad_is_removed_exactly():
    model = effnet_block()
    x = RNG.normal(size=(64, CIN, HW, HW)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "conv1")
    assert (row.kept, row.units) == (C - 1, C)
    assert removed_the_duplicate(model, pruned)
    assert initializer(pruned, "dw", 1).shape[0] == C - 1
    assert initializer(pruned, "conv2", 1).shape[1] == C - 1
    for size in (HW, HW + 1, HW + 4):  # other sizes too: the pads stay computed
        fresh = RNG.normal(size=(5, CIN, size, size)).astype(np.float32)
        assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


@pytest.mark.parametrize("kind", ["pooled", "pooled_size1", "map"])
def test_a_planted_duplicate_through_view_size0_into_a_gemm_is_removed_exactly(kind):
    model = classifier(kind)
    space = next(s for s in spaces_of(model) if s.name == "conv1")
    assert not space.pinned, space.pinned
    rewritten = [u for u in space.reshapes if u.via == "view"]
    assert [(u.position, u.block) for u in rewritten] == ([(0, 1)] if kind == "pooled_size1" else [])
    x = RNG.normal(size=(96, CIN, 3, 3)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    row = next(r for r in report.spaces if r.name == "conv1")
    assert (row.kept, row.units) == (C - 1, C)
    assert removed_the_duplicate(model, pruned)
    assert initializer(pruned, "fc", 1).shape == (3, (C - 1) * (1 if kind.startswith("pooled") else 9))
    fresh = RNG.normal(size=(5, CIN, 3, 3)).astype(np.float32)  # another batch size: N stays computed
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def test_view_size0_with_a_batch_entry_read_from_the_units_axis_pins():
    """view(x.size(1), -1): the first entry is the unit count, not the batch."""
    normal = Weights(3)
    g = GraphBuilder([1, CIN, 3, 3])
    h = g.op("GlobalAveragePool", [planted_conv(g, "x", normal, kernel=3)])
    first = unsqueeze(g, g.op("Gather", [g.op("Shape", [h]), scalar(g, 1)], axis=0))
    flat = g.op("Reshape", [h, g.op("Concat", [first, ints(g, -1)], axis=0)], name="view")
    model = g.build(g.gemm(flat, normal(3, 1), normal(3), name="fc", trans_b=1), [C, 3])
    space = next(s for s in spaces_of(model) if s.name == "conv1")
    assert space.pinned
