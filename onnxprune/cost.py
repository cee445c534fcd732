"""Cost model: MACs and parameters of a model, and how they scale with the kept units."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .analyse import Analysis
from .graph import GraphIndex, get_attr
from .ops import MAC_OPS, RECURRENT_GATES


def _prod(dims) -> int | None:
    if dims is None or any(d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def recurrent_macs(index: GraphIndex, node: onnx.NodeProto) -> tuple[int, int]:
    """(input, recurrent) multiply-accumulates of an LSTM/GRU/RNN: steps x batch x directions x
    gates x hidden times the input size (X W^T) and the hidden size (H R^T); (0, 0) if unknown."""
    x_shape, w_shape = index.shape(node.input[0]), index.shape(node.input[1]) if len(node.input) > 1 else None
    rows = _prod(x_shape[:2] if x_shape and len(x_shape) == 3 else None)
    if not rows or not w_shape or len(w_shape) != 3 or None in w_shape:
        return 0, 0
    directions, gate_rows, inputs = (int(d) for d in w_shape)
    hidden = gate_rows // RECURRENT_GATES[node.op_type]
    return rows * directions * gate_rows * inputs, rows * directions * gate_rows * hidden


def node_macs(index: GraphIndex, node: onnx.NodeProto) -> int:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN at the indexed shapes (0 if unknown)."""
    op = node.op_type
    if op in RECURRENT_GATES:
        return sum(recurrent_macs(index, node))
    if op not in MAC_OPS:
        return 0
    out_shape = index.shape(node.output[0])
    weight_shape = index.shape(node.input[1]) if len(node.input) > 1 else None
    if op == "Conv":
        out, kernel = _prod(out_shape), _prod(weight_shape[1:] if weight_shape else None)
        return out * kernel if out and kernel else 0
    if op == "ConvTranspose":
        inp, kernel = _prod(index.shape(node.input[0])), _prod(weight_shape[1:] if weight_shape else None)
        return inp * kernel if inp and kernel else 0
    a_shape = index.shape(node.input[0])
    out = _prod(out_shape)
    if not out or not a_shape or a_shape[-1] is None:
        return 0
    inner = a_shape[0] if (op == "Gemm" and get_attr(node, "transA", 0)) else a_shape[-1]
    return out * int(inner)


def count_macs(index: GraphIndex) -> int:
    return sum(node_macs(index, node) for node in index.nodes)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all float initializers and Constant-node tensors (weights, biases, BN)."""
    constants = GraphIndex(model, shapes={}).constants
    return int(sum(constants.size(name) for name in constants if constants.dtype(name).kind == "f"))


@dataclass
class CostTerm:
    """`base` scaled by the kept fraction of each listed tensor's unit axis."""

    base: int
    tensors: tuple[str, ...]
    appears_when: str | None = None  # a bias that recovery creates once this tensor loses units


@dataclass
class CostModel:
    """MACs and params as products of kept fractions of unit axes (exact for Conv/Gemm/MatMul).

    A tensor's kept fraction is 1 - sum over the spaces on it of count x (1 - space fraction) / width.
    """

    occupancy: dict[str, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    macs_terms: list[CostTerm] = field(default_factory=list)
    params_terms: list[CostTerm] = field(default_factory=list)
    node_macs: dict[str, CostTerm] = field(default_factory=dict)
    recurrent_macs: dict[str, CostTerm] = field(default_factory=dict)  # an LSTM's H x H part, beside its input part

    def node_terms(self, label: str) -> list[CostTerm]:
        """Every MAC term of one node (a recurrent op has two)."""
        return [t for t in (self.node_macs.get(label), self.recurrent_macs.get(label)) if t is not None]

    @property
    def total_macs(self) -> int:
        return sum(t.base for t in self.macs_terms if t.appears_when is None)

    @property
    def total_params(self) -> int:
        return sum(t.base for t in self.params_terms if t.appears_when is None)

    def tensor_fraction(self, tensor: str, fraction: dict[int, float]) -> float:
        width, spaces = self.occupancy[tensor]
        return 1.0 - sum(count * (1.0 - fraction.get(sid, 1.0)) for sid, count in spaces) / width

    def evaluate(self, terms: list[CostTerm], fraction: dict[int, float]) -> float:
        cache: dict[str, float] = {}
        total = 0.0
        for term in terms:
            if term.appears_when is not None and self.tensor_fraction(term.appears_when, fraction) >= 1.0:
                continue
            value = float(term.base)
            for tensor in term.tensors:
                if tensor not in cache:
                    cache[tensor] = self.tensor_fraction(tensor, fraction)
                value *= cache[tensor]
            total += value
        return total

    def macs(self, fraction: dict[int, float]) -> float:
        return self.evaluate(self.macs_terms, fraction)

    def params(self, fraction: dict[int, float]) -> float:
        return self.evaluate(self.params_terms, fraction)


def build_cost_model(index: GraphIndex, analysis: Analysis, recovery: bool = True) -> CostModel:
    """Which unit axes scale each node's MACs and each constant's size (with `recovery`, also
    the biases that least-squares recovery adds to consumers that have none)."""
    model = CostModel()
    node_tensors: dict[str, set[str]] = {}
    const_tensors: dict[str, set[str]] = {}
    recurrent_tensors: dict[str, tuple[str, ...]] = {}  # a recurrent op's H x H part: its hidden units twice
    recurrent_weights: dict[str, tuple[str, ...]] = {}  # R: its rows and its columns, the hidden units twice (one name when Y is the site)
    for space in [*analysis.prunable, *analysis.derived]:  # a derived space (KV heads) shrinks its producers with its plan
        for tensor, placement in space.tensors.items():
            model.occupancy.setdefault(tensor, (placement.width, []))[1].append((space.id, placement.count()))
        for label in space.producers:
            node_tensors.setdefault(label, set()).add(index.node(label).output[0])
        for consumer in space.consumers:
            node_tensors.setdefault(consumer.node, set()).add(consumer.site)
            const_tensors.setdefault(index.node(consumer.node).input[consumer.weight_index], set()).add(consumer.site)
        for attr in space.attrs:
            node_tensors.setdefault(attr.node, set()).add(attr.tensor)
        for label in space.pass_through:  # attention's activation x activation MatMuls scale with the heads
            node = index.node(label)
            if node.op_type == "MatMul" and node.input[0] in space.tensors:
                node_tensors.setdefault(label, set()).add(node.input[0])
        for cut in space.slices:
            const_tensors.setdefault(index.node(cut.node).input[cut.input_index], set()).add(cut.tensor)
        for read in space.recurrent_reads:  # R [directions, gates x H, H]: its rows and columns both scale
            recurrent_tensors[read.node] = (index.node(read.node).output[0], read.site)
            recurrent_weights[index.node(read.node).input[2]] = recurrent_tensors[read.node]
    for node in index.nodes:
        # a recurrent op's input part scales with its input and hidden units, the recurrent part
        # with its hidden units twice (on both sides of R)
        macs, fixed = recurrent_macs(index, node) if node.op_type in RECURRENT_GATES else (node_macs(index, node), 0)
        if macs:
            label = index.label(node)
            if fixed:
                model.recurrent_macs[label] = CostTerm(fixed, tuple(sorted(recurrent_tensors.get(label, ()))))
                model.macs_terms.append(model.recurrent_macs[label])
            term = CostTerm(macs, tuple(sorted(node_tensors.get(label, ()))))
            model.macs_terms.append(term)
            model.node_macs[label] = term
    constants = index.constants
    for name in constants:
        if constants.dtype(name).kind == "f":
            both = recurrent_weights.get(name, ())
            tensors = tuple(sorted(const_tensors.get(name, set()) - set(both))) + both
            model.params_terms.append(CostTerm(constants.size(name), tensors))
    if recovery:
        model.params_terms.extend(_missing_bias_terms(index, analysis, node_tensors))
    return model


def _missing_bias_terms(index: GraphIndex, analysis: Analysis, node_tensors: dict[str, set[str]]) -> list[CostTerm]:
    terms = {}
    for space in analysis.prunable:
        for consumer in space.consumers:
            node = index.node(consumer.node)
            if node.op_type == "MatMul":
                uses = index.uses.get(node.output[0], [])
                has_bias = len(uses) == 1 and uses[0].node.op_type == "Add" and any(index.is_constant(i) for i in uses[0].node.input)
            else:
                bias_slot = 3 if node.op_type in RECURRENT_GATES else 2
                has_bias = len(node.input) > bias_slot and bool(node.input[bias_slot])
            if has_bias:
                continue
            outputs = index.const(node.input[consumer.weight_index]).shape[consumer.out_axis]
            if node.op_type in RECURRENT_GATES:  # B: [directions, 2 x gates x hidden]
                outputs *= 2 * index.const(node.input[consumer.weight_index]).shape[0]
            out_tensor = tuple(t for t in node_tensors.get(consumer.node, ()) if t == node.output[0])
            terms[consumer.node] = CostTerm(int(outputs), out_tensor, appears_when=consumer.site)
    return list(terms.values())
