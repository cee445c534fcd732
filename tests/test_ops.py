"""Every supported op pattern, pruned at ratio 0.3 and at ratio 0.

Each case has one prunable space of U = 10 units made by the first producer (`p`), carried
through the op(s) under test to a consumer; the last layer is a graph output (pinned).
Units 7 and 8 are identical copies of units 0 and 1 (weights, bias and every per-unit
parameter downstream) and unit 9 has zero weights and a constant bias, so it is constant
after any per-unit op. These 3 units (30%) are exactly redundant: at ratio 0.3 SNP must remove
them and the least-squares fold (unit copies into the consumer weight, the constant into the
consumer bias) must give the original output on fresh inputs. That checks the fold of every
pattern, not only that the rewritten graph is valid.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, op_types, relative_l2, run
from onnxprune.score import METHODS
from onnxprune.verify import OutputFidelity

U = 10  # units of the space under test
DUP = ((7, 0), (8, 1))  # (copy, original)
CONST = 9


def producer_weight(rng: np.random.Generator, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Random weight with units on `axis`: copies planted, unit CONST zero."""
    fan_in = int(np.prod(shape)) // shape[axis]
    w = np.moveaxis((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), axis, 0)
    for copy, src in DUP:
        w[copy] = w[src]
    w[CONST] = 0
    return np.ascontiguousarray(np.moveaxis(w, 0, axis))


def producer_bias(rng: np.random.Generator) -> np.ndarray:
    b = (0.2 * rng.standard_normal(U)).astype(np.float32)
    for copy, src in DUP:
        b[copy] = b[src]
    b[CONST] = 0.5
    return b


def per_unit(rng: np.random.Generator, low: float, high: float, shape: tuple[int, ...] = (U,)) -> np.ndarray:
    """A per-unit parameter (units on axis 0 of `shape`, or the only non-1 axis) with the copies planted."""
    p = rng.uniform(low, high, size=(U,)).astype(np.float32)
    for copy, src in DUP:
        p[copy] = p[src]
    return p.reshape(shape)


def consumer_weight(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    input_shape: tuple[int, ...]
    check: Callable[[Case, onnx.ModelProto], None] | None = None  # extra assertions on the ratio-0.3 model

    def inputs(self, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, *self.input_shape[1:])).astype(np.float32)


HW = 6


# -- conv producers -----------------------------------------------------------------------------
def conv_chain(
    name: str,
    middle: Callable[[GraphBuilder, str, np.random.Generator], str] = lambda g, x, rng: g.op("Relu", [x]),
    *,
    p_bias: bool = True,
    c_bias: bool = True,
    opset: int = 17,
    check=None,
) -> Case:
    """Conv(3->U, 3x3, pad 1) -> middle -> Conv(U->4, 1x1)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    g = GraphBuilder([None, 3, HW, HW], opset=opset)
    y = g.conv(g.input_name, producer_weight(rng, (U, 3, 3, 3)), producer_bias(rng) if p_bias else None, name="p", pads=[1, 1, 1, 1])
    y = middle(g, y, rng)
    out = g.conv(y, consumer_weight(rng, (4, U, 1, 1)), (0.1 * rng.standard_normal(4)).astype(np.float32) if c_bias else None, name="c")
    side = {"maxpool": HW // 2, "depthwise": HW - 2}.get(name, HW)
    return Case(name, g.build(out, ["N", 4, side, side]), (1, 3, HW, HW), check)


def conv_into_linear(name: str, kind: str, check=None) -> Case:
    """Conv(3->U) -> Relu -> {flatten_gemm, flatten_gemm_t, gap_gemm, reshape_gemm, reshape_matmul} (-> 5)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    g = GraphBuilder([None, 3, HW, HW])
    y = g.conv(g.input_name, producer_weight(rng, (U, 3, 3, 3)), producer_bias(rng), name="p", pads=[1, 1, 1, 1])
    y = g.op("Relu", [y])
    features = U * HW * HW
    if kind == "gap_gemm":
        y = g.op("GlobalAveragePool", [y])
        features = U
    if kind.startswith("reshape"):
        y = g.op("Reshape", [y, g.const(np.array([-1, features], np.int64), "shape", dtype=np.int64)], name="reshape")
    else:
        y = g.op("Flatten", [y], axis=1)
    w = consumer_weight(rng, (5, features))
    b = (0.1 * rng.standard_normal(5)).astype(np.float32)
    if kind == "flatten_gemm_t":
        out = g.gemm(y, w, b, name="c", trans_b=1)
    elif kind == "reshape_matmul":
        out = g.matmul(y, np.ascontiguousarray(w.T), b, name="c")
    else:
        out = g.gemm(y, np.ascontiguousarray(w.T), b, name="c", trans_b=0)
    return Case(name, g.build(out, ["N", 5]), (1, 3, HW, HW), check)


# -- dense producers ----------------------------------------------------------------------------
def dense_chain(name: str, producer: str, consumer: str, activation: str = "Relu", check=None, tokens: bool = False,
                middle: Callable[[GraphBuilder, str], str] | None = None) -> Case:
    """producer(16 -> U) -> activation [-> middle] -> consumer(U -> 4). Kinds: gemm (transB 0),
    gemm_t (transB 1), gemm_t_2d_bias (C of shape [1, n]), gemm_ab (alpha 0.5, beta 2), gemm_noc (no C), matmul_add, matmul_add_swapped
    (bias Add(b, y)), matmul (no bias)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = [None, 5, 16] if tokens else [None, 16]
    g = GraphBuilder(shape, opset=20 if activation == "Gelu" else 17)

    def linear(x: str, kind: str, w_out_in: np.ndarray, b: np.ndarray, node: str) -> str:
        if kind == "gemm":
            return g.gemm(x, np.ascontiguousarray(w_out_in.T), b, name=node, trans_b=0)
        if kind == "gemm_t":
            return g.gemm(x, w_out_in, b, name=node, trans_b=1)
        if kind == "gemm_t_2d_bias":  # C of shape [1, n]
            return g.gemm(x, w_out_in, b.reshape(1, -1), name=node, trans_b=1)
        if kind == "gemm_ab":
            return g.gemm(x, w_out_in, b, name=node, trans_b=1, alpha=0.5, beta=2.0)
        if kind == "gemm_noc":
            return g.gemm(x, w_out_in, None, name=node, trans_b=1)
        if kind == "matmul_add":
            return g.matmul(x, np.ascontiguousarray(w_out_in.T), b, name=node)
        if kind == "matmul_add_swapped":
            y = g.op("MatMul", [x, g.const(np.ascontiguousarray(w_out_in.T), "w")], name=node)
            return g.op("Add", [g.const(b, "b"), y], name=f"{node}_add")
        if kind == "matmul":
            return g.matmul(x, np.ascontiguousarray(w_out_in.T), None, name=node)
        raise ValueError(kind)

    y = linear(g.input_name, producer, producer_weight(rng, (U, 16)), producer_bias(rng), "p")
    y = g.activation(activation, y)
    if middle is not None:
        y = middle(g, y)
    out = linear(y, consumer, consumer_weight(rng, (4, U)), (0.1 * rng.standard_normal(4)).astype(np.float32), "c")
    return Case(name, g.build(out, ["N", 5, 4] if tokens else ["N", 4]), tuple([1, *shape[1:]]), check)


# -- extra structural checks --------------------------------------------------------------------
def reshape_updated(block: int) -> Callable[[Case, onnx.ModelProto], None]:
    def check(case: Case, pruned: onnx.ModelProto) -> None:
        target = initializer(pruned, "reshape", 1)
        kept = initializer(pruned, "p", 1).shape[0]
        assert kept < U
        assert target.tolist() == [-1, kept * block], f"Reshape target not updated: {target.tolist()}"
    return check


def _prune_harder(case: Case) -> onnx.ModelProto:
    """Ratio 0.6: the recovery is no longer exact and its offset b0 = mu_P - B mu_K is not 0
    (ReLU units have positive means), so it must land in a bias."""
    return onnxprune.prune(case.model, _calib(case), ratio=0.6).model


def bias_inserted(case: Case, pruned: onnx.ModelProto) -> None:
    """MatMul consumer without a bias Add: the recovery inserts one after it."""
    pruned = _prune_harder(case)
    assert op_types(pruned).count("Add") == op_types(case.model).count("Add") + 1, op_types(pruned)
    matmul = next(n for n in pruned.graph.node if n.name == "c")
    add = next(n for n in pruned.graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    assert add.output[0] == pruned.graph.output[0].name  # the graph output keeps its name
    bias = next(onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name in add.input)
    assert bias.shape == (4,) and np.abs(bias).max() > 1e-3
    onnx.checker.check_model(pruned, full_check=True)


def conv_bias_added(case: Case, pruned: onnx.ModelProto) -> None:
    """Conv consumer without a bias: the recovery gives it one."""
    pruned = _prune_harder(case)
    consumer = next(n for n in pruned.graph.node if n.name == "c")
    assert len(consumer.input) == 3 and consumer.input[2], "the recovery must give the consumer Conv a bias"
    assert initializer(pruned, "c", 2).shape == (4,) and np.abs(initializer(pruned, "c", 2)).max() > 1e-3
    onnx.checker.check_model(pruned, full_check=True)


def gemm_bias_added(case: Case, pruned: onnx.ModelProto) -> None:
    """Gemm consumer without C: the constant unit's contribution becomes a C input."""
    consumer = next(n for n in pruned.graph.node if n.name == "c")
    assert len(consumer.input) == 3 and consumer.input[2], "the recovery must give the consumer Gemm a C input"
    assert np.abs(initializer(pruned, "c", 2)).max() > 1e-3


def depthwise_group(case: Case, pruned: onnx.ModelProto) -> None:
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    group = onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group"))
    assert group == initializer(pruned, "dw", 1).shape[0] == initializer(pruned, "p", 1).shape[0] < U


# -- middles ------------------------------------------------------------------------------------
def _bn(g: GraphBuilder, x: str, rng: np.random.Generator) -> str:
    x = g.bn(x, per_unit(rng, 0.5, 1.5), per_unit(rng, -0.2, 0.2), per_unit(rng, -0.1, 0.1), per_unit(rng, 0.5, 1.5))
    return g.op("Relu", [x])


def _activation(kind: str):
    return lambda g, x, rng: g.activation(kind, x)


def _maxpool(g, x, rng):
    return g.op("MaxPool", [g.op("Relu", [x])], kernel_shape=[2, 2], strides=[2, 2])


def _avgpool(g, x, rng):
    return g.op("AveragePool", [g.op("Relu", [x])], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])


def _depthwise(g, x, rng):
    x = g.op("Relu", [x])
    w = per_unit(rng, -1.0, 1.0, (U, 1, 1, 1)) * np.ones((1, 1, 3, 3), np.float32)
    w = (w * rng.uniform(0.5, 1.5, size=(1, 1, 3, 3))).astype(np.float32)  # same taps pattern, per-unit scale
    x = g.conv(x, w, per_unit(rng, -0.1, 0.1), name="dw", group=U)  # no padding: constants stay constant
    return g.op("Relu", [x])


def _dropout_identity(g, x, rng):
    return g.op("Identity", [g.op("Dropout", [g.op("Relu", [x])])])


def _prelu(g, x, rng):
    return g.op("PRelu", [x, g.const(per_unit(rng, 0.05, 0.3, (U, 1, 1)), "slope")])


def _per_unit_affine(g, x, rng):
    x = g.op("Mul", [x, g.const(per_unit(rng, 0.5, 2.0, (1, U, 1, 1)), "scale")])
    x = g.op("Add", [x, g.const(per_unit(rng, -0.3, 0.3, (U, 1, 1)), "shift")])
    return g.op("Relu", [x])


ACTIVATIONS = ["Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu", "ErfGelu"]


def build_cases() -> list[Case]:
    cases = [
        conv_chain("conv_conv"),
        conv_chain("conv_nobias", p_bias=False, c_bias=False, check=conv_bias_added),
        conv_chain("conv_bn_relu", _bn),
        *[conv_chain(f"conv_{a.lower()}", _activation(a), opset=20 if a == "Gelu" else 17) for a in ACTIVATIONS],
        conv_chain("maxpool", _maxpool),
        conv_chain("avgpool_padded", _avgpool),
        conv_chain("depthwise", _depthwise, check=depthwise_group),
        conv_chain("dropout_identity", _dropout_identity),
        conv_chain("prelu", _prelu),
        conv_chain("per_unit_mul_add", _per_unit_affine),
        conv_into_linear("flatten_gemm", "flatten_gemm"),
        conv_into_linear("flatten_gemm_transb", "flatten_gemm_t"),
        conv_into_linear("gap_flatten_gemm", "gap_gemm"),
        conv_into_linear("reshape_gemm", "reshape_gemm", check=reshape_updated(HW * HW)),
        conv_into_linear("reshape_matmul", "reshape_matmul", check=reshape_updated(HW * HW)),
        dense_chain("gemm_transb0", "gemm", "gemm"),
        dense_chain("gemm_transb1", "gemm_t", "gemm_t"),
        dense_chain("gemm_alpha_beta", "gemm_t", "gemm_ab"),
        dense_chain("gemm_2d_biases", "gemm_t_2d_bias", "gemm_t_2d_bias"),
        dense_chain("gemm_no_c", "gemm_t", "gemm_noc", check=gemm_bias_added),
        dense_chain("matmul_add", "matmul_add", "matmul_add"),
        dense_chain("matmul_add_swapped", "matmul_add", "matmul_add_swapped"),
        dense_chain("matmul_nobias", "matmul", "matmul", check=bias_inserted),
        dense_chain("matmul_tokens", "matmul_add", "matmul", tokens=True, check=bias_inserted),
        dense_chain("gemm_erf_gelu", "gemm_t", "gemm_t", activation="ErfGelu"),
        dense_chain("gemm_dropout_identity", "gemm_t", "gemm", middle=lambda g, x: g.op("Identity", [g.op("Dropout", [x])])),
    ]
    return cases


CASES = build_cases()
IDS = [c.name for c in CASES]


def _calib(case: Case) -> dict[str, np.ndarray]:
    return {"x": case.inputs(48 if len(case.input_shape) == 4 else 200, seed=1)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prune_ratio_0_3(case: Case) -> None:
    model, report = onnxprune.prune(case.model, _calib(case), ratio=0.3)
    onnx.checker.check_model(model, full_check=True)

    rows = [s for s in report.spaces if not s.pinned]
    assert [(r.units, r.kept) for r in rows] == [(U, U - 3)], [(r.name, r.units, r.kept, r.pinned) for r in report.spaces]
    assert report.units_after == U - 3
    assert report.macs_after < report.macs_before
    assert report.params_after < report.params_before

    x = case.inputs(16, seed=7)  # fresh inputs, not the calibration set
    expected, got = run(case.model, x), run(model, x)
    assert got.shape == expected.shape
    assert np.isfinite(got).all()
    # the 3 removed units are exactly redundant: the recovered model is the original
    assert relative_l2(expected, got) < 1e-4
    # onnxruntime with graph optimisations off computes the same
    np.testing.assert_allclose(run(model, x, optimize=False), got, rtol=1e-4, atol=1e-5)
    assert all(isinstance(f, OutputFidelity) and f.relative_l2 < 1e-4 for f in report.fidelity)
    if case.check is not None:
        case.check(case, model)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prune_ratio_0_is_bit_identical(case: Case) -> None:
    model, report = onnxprune.prune(case.model, _calib(case), ratio=0)
    onnx.checker.check_model(model, full_check=True)
    assert report.units_after == report.units_before
    assert report.macs_after == report.macs_before and report.params_after == report.params_before
    x = case.inputs(16, seed=7)
    assert np.array_equal(run(case.model, x), run(model, x))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_rewrites_a_valid_model(method: str) -> None:
    case = next(c for c in CASES if c.name == "conv_bn_relu")
    model, report = onnxprune.prune(case.model, _calib(case), ratio=0.3, method=method, seed=3)
    onnx.checker.check_model(model, full_check=True)
    assert report.method == method
    assert report.units_after == U - 3
    assert run(model, case.inputs(4, seed=7)).shape == (4, 4, HW, HW)


@pytest.mark.parametrize("order", ["pivoted", "weighted", "obs", "variance", "residual"])
def test_every_snp_order_removes_the_planted_units(order: str) -> None:
    """Any order followed by the Cholesky energies finds the 3 exactly redundant units of a
    Gemm chain at the tolerance (energy ~ 0), whatever it puts first."""
    case = next(c for c in CASES if c.name == "gemm_transb1")
    model, report = onnxprune.prune(case.model, _calib(case), tolerance=1e-6, order=order)
    x = case.inputs(16, seed=7)
    if order in ("pivoted", "weighted", "obs"):  # greedy: redundant units are last by construction
        assert report.units_after == U - 3
        assert relative_l2(run(case.model, x), run(model, x)) < 1e-4
    else:  # score-then-orthogonalise: a D = 0 unit in the middle is not removed, but nothing is lost
        assert report.units_after >= U - 3
        assert relative_l2(run(case.model, x), run(model, x)) < 1e-4


def test_the_callers_model_is_not_modified() -> None:
    case = next(c for c in CASES if c.name == "conv_bn_relu")
    before = case.model.SerializeToString()
    pruned, _ = onnxprune.prune(case.model, _calib(case), ratio=0.3)
    assert case.model.SerializeToString() == before
    assert pruned.SerializeToString() != before


def test_exclude_pins_the_matching_producer() -> None:
    case = next(c for c in CASES if c.name == "conv_bn_relu")
    with pytest.raises(onnxprune.ModelError, match="nothing to prune"):
        onnxprune.prune(case.model, _calib(case), ratio=0.3, exclude=["p"])
    model, report = onnxprune.prune(case.model, _calib(case), tolerance=0.0, exclude=["q*"])  # matches nothing
    assert [row.name for row in report.spaces if not row.pinned] == ["p"]
