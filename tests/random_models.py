"""Random CNN / MLP graphs for the property tests, described by a small `NetSpec`.

A spec is a list of blocks; each block produces `width` distinct units plus `copies` planted
exact copies (a copy has the same producer weights, bias and BatchNorm parameters as its
source unit, so its activation is identical after any element-wise op). Blocks can be
sequential or residual (`identity`: act(conv_a(x)) + conv_b(act(conv_a(x))); `branches`:
act(conv_a(x)) + conv_b(x)), optionally with BatchNormalization and (CNN) pooling.

Producer weights are fitted to the data as they are built (like an LSUV initialisation):
on a reference batch, the distinct input units (times kernel taps) are whitened and the
effective weights have orthonormal rows whenever the layer is not wider than that, so every
distinct pre-activation is centred (when the layer has a bias) with unit variance, and
BatchNormalization uses the measured means and variances. The effective weight on each
distinct input is split at random between the units that carry it (a unit and its copies).
In a well-conditioned spec (`NetSpec.well_conditioned`) the only redundancy is the planted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from builders import GraphBuilder, session

ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSwish", "ErfGelu")
LINEAR_STYLES = ("gemm0", "gemm1", "matmul")  # Gemm transB=0, Gemm transB=1, MatMul (+ Add bias)


def max_width(kind: str, rank: int, kernel: int, bias: bool, hw: int = 1) -> int:
    """The widest well-conditioned layer on `rank` distinct input units (CNN: of size hw x hw;
    its k x k patches span at most rank * min(k * k, hw * hw) dimensions)."""
    taps = min(kernel * kernel, hw * hw) if kind == "cnn" else 1
    return rank * taps - (0 if bias else 1)


@dataclass(frozen=True)
class Block:
    width: int  # distinct units
    copies: int = 0  # planted exact copies (extra units)
    act: str = "Relu"
    kernel: int = 3  # CNN only: 1 or 3 (pad 1)
    bn: bool = False
    pool: str | None = None  # CNN only: MaxPool / AveragePool (2x2, stride 2)
    residual: str | None = None  # None, "identity" or "branches"
    bias: bool = True
    style: str = "gemm1"  # MLP only: one of LINEAR_STYLES

    @property
    def units(self) -> int:
        return self.width + self.copies


@dataclass(frozen=True)
class NetSpec:
    kind: str  # "cnn" or "mlp"
    in_features: int  # CNN input channels or MLP input features
    blocks: tuple[Block, ...]
    hw: int = 8  # CNN input height = width
    head: str = "flatten"  # CNN: "flatten" (Flatten -> Gemm) or "gap" (GlobalAveragePool -> Flatten -> Gemm)
    head_style: str = "gemm1"
    classes: int = 4
    seed: int = 0

    def spatial_sizes(self) -> list[int]:
        """Spatial size after each block (CNN)."""
        sizes, hw = [], self.hw
        for block in self.blocks:
            if block.pool and hw >= 2:
                hw //= 2
            sizes.append(hw)
        return sizes

    def well_conditioned(self) -> bool:
        """Every block is at most as wide (distinct units) as its distinct inputs x kernel taps
        (one less without a bias, to keep the pre-activations centred), so that no unplanted
        unit is (nearly) a linear function of the others."""
        rank, hw = self.in_features, self.hw
        for block, after in zip(self.blocks, self.spatial_sizes(), strict=True):
            if block.width > max_width(self.kind, rank, block.kernel, block.bias, hw):
                return False
            rank, hw = block.width, after
        return True


@dataclass
class RandomNet:
    model: onnx.ModelProto
    spec: NetSpec
    input_shape: tuple[int, ...]  # one sample, batch 1
    output_shape: tuple[int, ...]  # one sample, batch 1
    producers: list[list[str]] = field(default_factory=list)  # per block: its producer node names
    copies: list[list[tuple[int, int]]] = field(default_factory=list)  # per block: (source, copy) unit pairs

    def inputs(self, n: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, *self.input_shape[1:])).astype(np.float32)


def _unit_map(rng: np.random.Generator, width: int, copies: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Distinct index of every unit (copies share their source's index), in a random order, and
    the (source position, copy position) pairs."""
    distinct = list(range(width)) + [int(rng.integers(width)) for _ in range(copies)]
    order = rng.permutation(len(distinct))
    unit_map = np.asarray(distinct)[order]
    pairs = []
    for position in range(width, width + copies):
        copy = int(np.flatnonzero(order == position)[0])
        source = int(np.flatnonzero(order == distinct[position])[0])
        pairs.append((source, copy))
    return unit_map, pairs


def _orthonormal(rng: np.random.Generator, n_out: int, fan_in: int, avoid: np.ndarray | None = None) -> np.ndarray:
    """n_out x fan_in: orthonormal rows when n_out <= fan_in (also orthogonal to `avoid` when
    there is room), else Gaussian rows of norm ~1."""
    if n_out > fan_in:
        return rng.standard_normal((n_out, fan_in)) / np.sqrt(fan_in)
    if avoid is not None and n_out < fan_in and np.linalg.norm(avoid) > 0:
        q, _ = np.linalg.qr(np.column_stack([avoid, rng.standard_normal((fan_in, n_out))]))
        return q[:, 1:].T
    q, _ = np.linalg.qr(rng.standard_normal((fan_in, n_out)))
    return q.T


def _whitener(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W): W (features - mean) has white rows on these samples, one per direction the
    features actually span (directions with no variance, e.g. always-zero padding taps, are left out)."""
    mean = features.mean(axis=0)
    centred = features - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / len(features))
    span = values > 1e-6 * max(values.max(), 1e-30)
    return mean, (vectors[:, span] / np.sqrt(values[span])).T


def _split(rng: np.random.Generator, eff: np.ndarray, in_map: np.ndarray) -> np.ndarray:
    """[out, distinct in, taps] effective weights -> [out, units in, taps]: the weight on each
    distinct input is split at random between the input units that carry it."""
    n_out, rank, taps = eff.shape
    full = np.zeros((n_out, len(in_map), taps))
    scale = np.abs(eff).mean() + 1e-12
    for u in range(rank):
        carriers = np.flatnonzero(in_map == u)
        rest = 0.0
        for c in carriers[1:]:
            full[:, c] = scale * rng.standard_normal((n_out, taps))
            rest = rest + full[:, c]
        full[:, carriers[0]] = eff[:, u] - rest
    return full


def _patches(values: np.ndarray, kernel: int) -> np.ndarray:
    """[N, C, H, W] -> [N*H*W, C*k*k] rows of k x k patches (zero padding k // 2), ordered like
    a Conv weight's [C, kh, kw]."""
    n, c, h, w = values.shape
    pad = kernel // 2
    padded = np.pad(values, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    taps = [padded[:, :, i:i + h, j:j + w] for i in range(kernel) for j in range(kernel)]
    stacked = np.stack(taps, axis=2)  # N, C, k*k, H, W
    return stacked.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * kernel * kernel)


def _per_unit(values: np.ndarray, out_map: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)[out_map]


class _Net:
    REFERENCE = {"cnn": 48, "mlp": 256}  # reference samples the weights are fitted on

    def __init__(self, spec: NetSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        cnn = spec.kind == "cnn"
        shape = [None, spec.in_features, spec.hw, spec.hw] if cnn else [None, spec.in_features]
        self.g = GraphBuilder(shape)
        self.input_shape = (1, spec.in_features, spec.hw, spec.hw) if cnn else (1, spec.in_features)
        self.reference = self.rng.standard_normal((self.REFERENCE[spec.kind], *self.input_shape[1:])).astype(np.float32)
        self.x = self.g.input_name
        self.in_map = np.arange(spec.in_features)
        self.hw = spec.hw
        self.producers: list[list[str]] = []
        self.copies: list[list[tuple[int, int]]] = []

    def values(self, tensor: str) -> np.ndarray:
        """`tensor` on the reference batch (the graph built so far, run in onnxruntime)."""
        if tensor == self.g.input_name:
            return self.reference.astype(np.float64)
        graph = helper.make_graph(self.g.nodes, "partial", self.g.inputs, [helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None)], self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.g.opset)])
        model.ir_version = 8
        return session(model).run(None, {self.g.input_name: self.reference})[0].astype(np.float64)

    # -- layers -------------------------------------------------------------------------------
    def linear(self, x: str, out_map: np.ndarray, block: Block, name: str, gain: float = 1.0) -> str:
        """Conv (CNN) or Gemm/MatMul (MLP) from the units of `x` (distinct units `self.in_map`)
        to `out_map` units, fitted so that the distinct pre-activations are white."""
        rng, in_map = self.rng, self.in_map
        n_out, rank = int(out_map.max()) + 1, int(in_map.max()) + 1
        carriers = np.asarray([np.flatnonzero(in_map == u)[0] for u in range(rank)])
        values = self.values(x)[:, carriers]
        k = block.kernel if self.spec.kind == "cnn" else 1
        features = _patches(values, k) if self.spec.kind == "cnn" else values
        mean, white = _whitener(features)
        # without a bias, rows orthogonal to the whitened mean keep the pre-activations centred
        eff = gain * _orthonormal(rng, n_out, len(white), None if block.bias else white @ mean) @ white
        bias = None
        if block.bias:
            bias = (0.3 * gain * rng.standard_normal(n_out) - eff @ mean)[out_map].astype(np.float32)
        w = _split(rng, eff.reshape(n_out, rank, k * k), in_map)[out_map].astype(np.float32)
        if self.spec.kind == "cnn":
            return self.g.conv(x, w.reshape(len(out_map), len(in_map), k, k), bias, name=name, pads=[k // 2] * 4)
        return self._dense(x, w[:, :, 0], bias, block.style, name)

    def _dense(self, x: str, w: np.ndarray, bias: np.ndarray | None, style: str, name: str) -> str:
        if style == "gemm1":
            return self.g.gemm(x, w, bias, name=name, trans_b=1)
        if style == "gemm0":
            return self.g.gemm(x, np.ascontiguousarray(w.T), bias, name=name, trans_b=0)
        return self.g.matmul(x, np.ascontiguousarray(w.T), bias, name=name)

    def bn(self, x: str, out_map: np.ndarray, name: str) -> str:
        """BatchNormalization with the measured statistics (slightly off) and a random affine."""
        rng, n = self.rng, int(out_map.max()) + 1
        values = self.values(x)
        axes = tuple(a for a in range(values.ndim) if a != 1)
        first = np.asarray([np.flatnonzero(out_map == u)[0] for u in range(n)])
        measured_mean, measured_var = values.mean(axis=axes)[first], values.var(axis=axes)[first]
        gamma = _per_unit(0.5 + rng.random(n), out_map)
        beta = _per_unit(0.3 * rng.standard_normal(n), out_map)
        mean = _per_unit(measured_mean + 0.1 * rng.standard_normal(n), out_map)
        var = _per_unit(measured_var * (0.7 + 0.6 * rng.random(n)) + 1e-3, out_map)
        return self.g.bn(x, gamma, beta, mean, var, name=name)

    # -- blocks -------------------------------------------------------------------------------
    def block(self, i: int, block: Block) -> None:
        out_map, pairs = _unit_map(self.rng, block.width, block.copies)
        name = f"b{i}"
        block_input, input_map = self.x, self.in_map
        a = self.linear(block_input, out_map, block, f"{name}_a")
        producers = [f"{name}_a"]
        if block.bn:
            a = self.bn(a, out_map, f"{name}_bn_a")
        a = self.g.activation(block.act, a)
        if block.residual is not None:
            if block.residual == "identity":  # a + conv_b(a)
                source, self.in_map = a, out_map
            else:  # a + conv_b(x)
                source, self.in_map = block_input, input_map
            b = self.linear(source, out_map, block, f"{name}_b", gain=0.5)
            producers.append(f"{name}_b")
            if block.bn:
                b = self.bn(b, out_map, f"{name}_bn_b")
            a = self.g.op("Add", [a, b], name=f"{name}_add")
            a = self.g.activation(block.act, a)
        if self.spec.kind == "cnn" and block.pool and self.hw >= 2:
            a = self.g.op(block.pool, [a], name=f"{name}_pool", kernel_shape=[2, 2], strides=[2, 2])
            self.hw //= 2
        self.x, self.in_map = a, out_map
        self.producers.append(producers)
        self.copies.append(pairs)

    def head(self) -> tuple[str, tuple[int, ...]]:
        """The output layer (Gaussian weights; its units are a graph output, never pruned)."""
        spec, classes, rng = self.spec, self.spec.classes, self.rng
        bias = (0.1 * rng.standard_normal(classes)).astype(np.float32)
        rank = int(self.in_map.max()) + 1
        if spec.kind == "mlp":
            w = _split(rng, rng.standard_normal((classes, rank, 1)) / np.sqrt(rank), self.in_map)[:, :, 0].astype(np.float32)
            return self._dense(self.x, w, bias, spec.head_style, "head"), (1, classes)
        x, taps = self.x, self.hw * self.hw
        if spec.head == "gap":
            x, taps = self.g.op("GlobalAveragePool", [x], name="gap"), 1
        x = self.g.op("Flatten", [x], name="flatten", axis=1)
        eff = rng.standard_normal((classes, rank, taps)) / np.sqrt(rank * taps)
        w = _split(rng, eff, self.in_map).reshape(classes, -1).astype(np.float32)  # channel-major, like Flatten
        style = "gemm1" if spec.head_style == "matmul" else spec.head_style
        return self._dense(x, w, bias, style, "head"), (1, classes)


def build(spec: NetSpec) -> RandomNet:
    net = _Net(spec)
    for i, block in enumerate(spec.blocks):
        net.block(i, block)
    out, out_shape = net.head()
    model = net.g.build(out, ["N", *out_shape[1:]], name=f"random_{spec.kind}")
    return RandomNet(model, spec, net.input_shape, out_shape, net.producers, net.copies)
