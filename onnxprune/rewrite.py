"""Rewrite: apply a plan to a copy of the model — slice producers and per-unit constants,
fold the least-squares recovery into every consumer, fix shapes (DESIGN §3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analyse import Analysis, Consumer, Space
from .graph import GraphIndex, get_attr
from .plan import Plan, SpacePlan
from .recovery import Recovery

SUFFIX = "_onnxprune"


def fold_consumer_weight(
    weight: np.ndarray,
    consumer: Consumer,
    n: int,
    plan: SpacePlan,
    recovery: Recovery | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keep the consumer's input units; with a recovery, W_K += W_P B and return the bias delta W_P b0.

    For a Conv the fold is per kernel tap and the bias delta sums the taps; for Flatten into a
    Gemm it is per spatial position (`block` features per unit).
    """
    w = np.moveaxis(weight.astype(np.float64), consumer.in_axis, 0)
    rest = w.shape[1:]
    w = w.reshape(n, consumer.block, -1)
    kept = w[plan.keep]
    delta = None
    if recovery is not None and len(plan.prune):
        pruned = w[plan.prune]
        kept = kept + np.tensordot(recovery.weights, pruned, axes=(0, 0))
        full = np.tensordot(recovery.offset, pruned, axes=(0, 0)).sum(axis=0).reshape(rest)
        out_pos = consumer.out_axis - (consumer.out_axis > consumer.in_axis)
        delta = full.sum(axis=tuple(i for i in range(len(rest)) if i != out_pos))
    new = kept.reshape((len(plan.keep) * consumer.block, *rest))
    return np.moveaxis(new, 0, consumer.in_axis).astype(weight.dtype), delta


@dataclass
class _Edit:
    node: onnx.NodeProto
    slot: int
    value: np.ndarray


class ConstantEdits:
    """New values for constant inputs, keyed by (node, input slot); shared constants are copied."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex):
        self.model = model
        self.index = index
        self.edits: dict[tuple[int, int], _Edit] = {}
        self.bias_nodes: list[tuple[onnx.NodeProto, np.ndarray]] = []

    def get(self, label: str, slot: int) -> np.ndarray:
        node = self.index.node(label)
        edit = self.edits.get((id(node), slot))
        return edit.value if edit is not None else self.index.const(node.input[slot])

    def set(self, label: str, slot: int, value: np.ndarray) -> None:
        node = self.index.node(label)
        self.edits[(id(node), slot)] = _Edit(node, slot, value)

    def commit(self) -> set[str]:
        """Write the new values; returns the names of constants whose shape may have changed."""
        graph = self.model.graph
        use_count: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                use_count[name] = use_count.get(name, 0) + 1
        initializers = {t.name: t for t in graph.initializer}
        constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        orphans: set[str] = set()
        changed: set[str] = set()
        for edit in self.edits.values():
            name = edit.node.input[edit.slot] if edit.slot < len(edit.node.input) else ""
            changed.add(name)
            tensor = numpy_helper.from_array(np.ascontiguousarray(edit.value), name)
            if name and use_count.get(name, 0) == 1 and name in initializers:
                initializers[name].CopyFrom(tensor)
            elif name and use_count.get(name, 0) == 1 and name in constant_nodes:
                node = constant_nodes[name]
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", tensor))
            else:
                new_name = self._fresh_name(f"{name or edit.node.output[0]}{SUFFIX}")
                tensor.name = new_name
                graph.initializer.append(tensor)
                if name:
                    orphans.add(name)
                    edit.node.input[edit.slot] = new_name
                else:
                    while len(edit.node.input) < edit.slot:
                        edit.node.input.append("")
                    edit.node.input.append(new_name)
        self._insert_bias_nodes()
        _drop_unused_initializers(self.model, orphans)
        return changed

    def _insert_bias_nodes(self) -> None:
        graph = self.model.graph
        for producer, bias in self.bias_nodes:
            original = producer.output[0]
            inner = self._fresh_name(f"{original}{SUFFIX}_nobias")
            const = self._fresh_name(f"{original}{SUFFIX}_bias")
            graph.initializer.append(numpy_helper.from_array(bias, const))
            producer.output[0] = inner
            add = helper.make_node("Add", [inner, const], [original], name=self._fresh_name(f"{producer.name or original}{SUFFIX}_bias_add"))
            position = next(i for i, n in enumerate(graph.node) if n is producer)
            graph.node.insert(position + 1, add)

    def _fresh_name(self, base: str) -> str:
        taken = {t.name for t in self.model.graph.initializer}
        taken.update(o for n in self.model.graph.node for o in n.output)
        taken.update(n.name for n in self.model.graph.node)
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name


def _drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used.update(o.name for o in model.graph.output)
    keep = [t for t in model.graph.initializer if t.name in used or t.name not in candidates]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


class Rewriter:
    """Applies a Plan to a copy of the model."""

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, plan: Plan, recoveries: dict[tuple[int, str], Recovery] | None):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.analysis = analysis
        self.plan = plan
        self.recoveries = recoveries
        self.index = GraphIndex(self.model, shapes={})
        self.edits = ConstantEdits(self.model, self.index)

    def pruned_spaces(self) -> list[tuple[Space, SpacePlan]]:
        return [(s, self.plan.spaces[s.id]) for s in self.analysis.spaces if s.id in self.plan.spaces and len(self.plan.spaces[s.id].prune)]

    def run(self) -> onnx.ModelProto:
        spaces = self.pruned_spaces()
        if not spaces:
            return self.model
        for space, plan in spaces:  # phase 1: output axes and per-unit constants
            for cut in space.slices:
                self.edits.set(cut.node, cut.input_index, np.take(self.edits.get(cut.node, cut.input_index), plan.keep, axis=cut.axis))
            for attr in space.attrs:
                node = self.index.node(attr.node)
                for a in node.attribute:
                    if a.name == attr.attribute:
                        a.i = len(plan.keep)
            for update in space.reshapes:
                target = self.edits.get(update.node, update.input_index).copy()
                target[update.position] = len(plan.keep) * update.block
                self.edits.set(update.node, update.input_index, target)
        for space, plan in spaces:  # phase 2: consumers' input axes and recovery
            for consumer in space.consumers:
                recovery = None if self.recoveries is None else self.recoveries[(space.id, consumer.site)]
                weight = self.edits.get(consumer.node, consumer.weight_index)
                new_weight, delta = fold_consumer_weight(weight, consumer, space.n, plan, recovery)
                self.edits.set(consumer.node, consumer.weight_index, new_weight)
                if delta is not None:
                    self._add_bias(consumer, delta.astype(np.float64))
        changed = self.edits.commit()
        _refresh_value_info(self.model, changed | {t for s, _ in spaces for t in [*s.tensors, *s.flattened]})
        return self.model

    def _add_bias(self, consumer: Consumer, delta: np.ndarray) -> None:
        node = self.index.node(consumer.node)
        dtype = self.edits.get(consumer.node, consumer.weight_index).dtype
        if node.op_type == "Conv":
            self._add_to_input(consumer.node, 2, delta, dtype)
        elif node.op_type == "Gemm":
            alpha, beta = get_attr(node, "alpha", 1.0), get_attr(node, "beta", 1.0)
            has_c = len(node.input) > 2 and node.input[2]
            if has_c and not self.index.is_constant(node.input[2]):
                self.edits.bias_nodes.append((node, (alpha * delta).astype(dtype)))
                return
            if not has_c or beta == 0:
                _set_float_attr(node, "beta", 1.0)
                self.edits.set(consumer.node, 2, (alpha * delta).astype(dtype))
                return
            self._add_to_input(consumer.node, 2, alpha * delta / beta, dtype)
        else:  # MatMul: fold into a following Add of a constant, else add one
            bias_add = self._following_bias_add(node)
            if bias_add is None:
                self.edits.bias_nodes.append((node, delta.astype(dtype)))
            else:
                label, slot = bias_add
                self._add_to_input(label, slot, delta, dtype)

    def _add_to_input(self, label: str, slot: int, delta: np.ndarray, dtype: np.dtype) -> None:
        node = self.index.node(label)
        if slot < len(node.input) and node.input[slot]:
            current = self.edits.get(label, slot)
            self.edits.set(label, slot, (current.astype(np.float64) + delta).astype(current.dtype))
        else:
            self.edits.set(label, slot, delta.astype(dtype))

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


def _refresh_value_info(model: onnx.ModelProto, changed: set[str]) -> None:
    """Drop stale value_info of re-shaped tensors, then re-infer the ones the model listed."""
    stale = [v.name for v in model.graph.value_info if v.name in changed]
    if not stale:
        return
    keep = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the checker reports real problems later
        return
    fresh = {v.name: v for v in inferred.graph.value_info}
    model.graph.value_info.extend(fresh[name] for name in stale if name in fresh)


def rewrite(
    model: onnx.ModelProto,
    analysis: Analysis,
    plan: Plan,
    recoveries: dict[tuple[int, str], Recovery] | None,
) -> onnx.ModelProto:
    """A pruned copy of `model`; the input is not modified. No recovery when `recoveries` is None."""
    return Rewriter(model, analysis, plan, recoveries).run()
