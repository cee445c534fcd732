"""Folding the least-squares recovery into consumers: W_K <- W_K M + W_P B per tap, per
position or per head block, and the constant part into a bias (DESIGN §2). The Rewriter mixes
these in; they edit through its `edits`, `index` and `biases`."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .analyse import Consumer
from .graph import get_attr
from .ops import RECURRENT_GATES
from .recovery import Recovery
from .spaces import RecurrentRead, Space


def fold_consumer_weight(weight: np.ndarray, consumer: Consumer, width: int, recovery: Recovery) -> tuple[np.ndarray, np.ndarray]:
    """W_K += W_P B (W_K <- W_K M + W_P B with a kept map) and the bias delta, on the consumer's full (unsliced) weight.

    `width` is the site's unit-axis size; each position owns `consumer.block` features of the
    weight's input axis. For a Conv the fold is per kernel tap and the bias delta sums the taps,
    each weighted by its `consumer.coverage` (the share of outputs where it reads the input: a padded
    position reads zero in both models, so the recovery's constant must not reach it; on the
    H = 1 maps of an OCR neck a 3x3 kernel's top and bottom rows only read padding); for Flatten
    into a Gemm it is per spatial position (DESIGN §2).
    """
    w = np.moveaxis(weight.astype(np.float64), consumer.in_axis, 0)
    rest = w.shape[1:]
    w = w.reshape(width, consumer.block, -1).copy()
    pruned, kept = w[recovery.prune], w[recovery.keep]
    full = np.tensordot(recovery.offset, pruned, axes=(0, 0))
    if recovery.changes_kept:  # W_K <- W_K M + W_P B, bias += W_K m0 + W_P b0
        w[recovery.keep] = np.tensordot(recovery.kept_weights, kept, axes=(0, 0)) + np.tensordot(recovery.weights, pruned, axes=(0, 0))
        full = full + np.tensordot(recovery.kept_offset, kept, axes=(0, 0))
    else:
        w[recovery.keep] += np.tensordot(recovery.weights, pruned, axes=(0, 0))
    full = full.sum(axis=0).reshape(rest)
    if consumer.coverage is not None:  # a Conv: rest is (output channels, *kernel)
        full = full * np.asarray(consumer.coverage).reshape(rest[1:])
    out_pos = consumer.out_axis - (consumer.out_axis > consumer.in_axis)
    if consumer.op_type in RECURRENT_GATES:  # one input bias per direction: [directions, gates x hidden]
        delta = full
    else:
        delta = full.sum(axis=tuple(i for i in range(len(rest)) if i != out_pos))
    new = np.moveaxis(w.reshape((width * consumer.block, *rest)), 0, consumer.in_axis)
    return new.astype(weight.dtype), delta


class FoldMixin:
    """The Rewriter's folds and bias edits (needs `edits`, `index`, `biases`, `fold_cache`, `analysis`)."""

    def _with_bias_targets(self, only: set[str]) -> set[str]:
        """`only` with each MatMul consumer and the Add that takes its bias delta together (a
        fold edits both: one of them alone would leave the other one's part out)."""
        only = set(only)
        for space in self.analysis.prunable:
            for consumer in space.consumers:
                target = self._following_bias_add(self.index.node(consumer.node)) if consumer.op_type == "MatMul" else None
                if target is not None and (consumer.node in only or target[0] in only):
                    only.update((consumer.node, target[0]))
        return only

    def _fold(self, consumer: Consumer, width: int, recovery: Recovery) -> None:
        key = (consumer.node, consumer.weight_index, id(recovery))
        if self.fold_cache is not None and key in self.fold_cache:
            new_weight, delta = self.fold_cache[key]
        else:
            new_weight, delta = fold_consumer_weight(self.edits.get(consumer.node, consumer.weight_index), consumer, width, recovery)
            if self.fold_cache is not None:
                self.fold_cache[key] = (new_weight, delta)
        self.edits.set(consumer.node, consumer.weight_index, new_weight)
        node = self.index.node(consumer.node)
        if node.op_type == "ConvTranspose":  # a constant reaches each output through kernel/stride taps on average
            delta = delta / float(np.prod(get_attr(node, "strides", [1])))
        self._add_bias(consumer, delta)

    def _fold_states(self, space: Space, read: RecurrentRead) -> None:
        """R_d[:, K] += R_d[:, P] B_d and Rb_d += R_d[:, P] b0_d for every direction d (the
        recurrent op reads its own kept units back as h_(t-1)); zero initial states are dropped."""
        node = self.index.node(read.node)
        for slot in read.zero_states:
            node.input[slot] = ""
        recoveries = [self.recoveries.get((space.id, read.site, d)) for d in range(self.index.const_dims(node.input[2])[0])]
        if all(r is None for r in recoveries):  # a method without recovery only deletes
            return
        r = self.edits.get(read.node, 2).astype(np.float64)
        gate_rows = r.shape[1]
        rb = np.zeros((r.shape[0], 2 * gate_rows))
        for d, recovery in enumerate(recoveries):
            if recovery is not None:
                pruned = r[d][:, recovery.prune]
                r[d][:, recovery.keep] += pruned @ recovery.weights
                rb[d, gate_rows:] = pruned @ recovery.offset
        dtype = self.edits.get(read.node, 1).dtype
        self.edits.set(read.node, 2, r.astype(dtype))
        self._add_to_input(read.node, 3, rb, dtype)

    def _add_bias(self, consumer: Consumer, delta: np.ndarray) -> None:
        node = self.index.node(consumer.node)
        dtype = self.edits.get(consumer.node, consumer.weight_index).dtype
        if node.op_type in ("Conv", "ConvTranspose"):
            self._add_to_input(consumer.node, 2, delta, dtype)
        elif node.op_type == "Gemm":
            alpha, beta = get_attr(node, "alpha", 1.0), get_attr(node, "beta", 1.0)
            has_c = len(node.input) > 2 and node.input[2]
            if has_c and not self.index.is_constant(node.input[2]):
                self._add_bias_node(node, alpha * delta, dtype)
            elif not has_c or beta == 0:
                _set_float_attr(node, "beta", 1.0)
                self._add_to_input(consumer.node, 2, alpha * delta, dtype, replace=True)
            else:
                self._add_to_input(consumer.node, 2, alpha * delta / beta, dtype)
        elif node.op_type in RECURRENT_GATES:  # B = [Wb, Rb] per direction: the delta adds to Wb
            self._add_to_input(consumer.node, 3, np.concatenate([delta, np.zeros_like(delta)], axis=-1), dtype)
        else:  # MatMul: fold into a following Add of a constant, else add one
            bias_add = self._following_bias_add(node)
            if bias_add is None:
                self._add_bias_node(node, delta, dtype)
            else:
                self._add_to_input(*bias_add, delta, dtype)

    def _add_bias_node(self, node: onnx.NodeProto, delta: np.ndarray, dtype: np.dtype) -> None:
        for i, (pending, bias) in enumerate(self.edits.bias_nodes):
            if pending is node:
                self.edits.bias_nodes[i] = (node, (bias.astype(np.float64) + delta).astype(dtype))
                return
        self.edits.bias_nodes.append((node, delta.astype(dtype)))

    def _add_to_input(self, label: str, slot: int, delta: np.ndarray, dtype: np.dtype, replace: bool = False) -> None:
        """bias += delta (created when absent; `replace` ignores an existing value, for Gemm beta=0)."""
        node = self.index.node(label)
        key = (label, slot)
        exists = slot < len(node.input) and bool(node.input[slot])
        if (exists and not replace) or key in self.biases:
            current = self.edits.get(label, slot)
            self.edits.set(label, slot, (current.astype(np.float64) + delta).astype(current.dtype))
        else:
            self.edits.set(label, slot, delta.astype(dtype))
        self.biases[key] = node.output[0]

    def _following_bias_add(self, node: onnx.NodeProto) -> tuple[str, int] | None:
        out = node.output[0]
        uses = self.index.uses.get(out, [])
        if len(uses) != 1 or uses[0].node.op_type != "Add" or out in self.index.graph_outputs:
            return None
        add, slot = uses[0].node, 1 - uses[0].index
        value = self.index.const(add.input[slot])
        if value is None or value.ndim > 1 and any(d != 1 for d in value.shape[:-1]):
            return None
        return self.index.label(add), slot


def _set_float_attr(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.f = value
            return
    node.attribute.append(helper.make_attribute(name, value))
