"""Values computed at run time from the size of a unit axis: TorchScript's chunk point (Shape ->
Gather -> Add/Div/Mul -> Slice starts/ends), evaluated at analysis time so the Slice is read as a
constant window, and the sizes of `repeat_kv` (Shape -> Gather -> [Mul] -> Concat -> Expand /
Reshape targets). Both are rewritten as constants after pruning."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, evaluate_node, get_attr

# Shape arithmetic between the axis size and a Slice bound.
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Unsqueeze", "Squeeze", "Concat", "Identity", "Floor", "Ceil", "Neg"})


def _axis_size_entry(index: GraphIndex, node: onnx.NodeProto, tensor: str, axis: int) -> np.ndarray | None:
    """The value of Gather(Shape(tensor), k) when k is `axis` and that size is known."""
    if node.op_type != "Gather" or get_attr(node, "axis", 0) != 0 or not index.is_constant(node.input[1]):
        return None
    shape_node = index.producer.get(node.input[0])
    shape, rank = index.shape(tensor), index.rank(tensor)
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.input[0] != tensor or rank is None:
        return None
    if get_attr(shape_node, "start", 0) or get_attr(shape_node, "end") is not None:
        return None
    which = index.const(node.input[1])
    if which.size != 1 or int(which.reshape(-1)[0]) % rank != axis or shape[axis] is None:
        return None
    return np.full(which.shape, shape[axis], dtype=np.int64)


def axis_size_value(index: GraphIndex, name: str, tensor: str, axis: int, depth: int = 0) -> np.ndarray | None:
    """The value of `name` when it is computed only from constants and the size of `tensor`'s
    axis `axis`; None otherwise."""
    value = index.const(name)
    if value is not None or depth > 16:
        return value
    node = index.producer.get(name)
    if node is None or len(node.output) != 1:
        return None
    entry = _axis_size_entry(index, node, tensor, axis)
    if entry is not None or node.op_type not in ARITHMETIC:
        return entry
    known = {}
    for inp in dict.fromkeys(i for i in node.input if i):
        known[inp] = axis_size_value(index, inp, tensor, axis, depth + 1)
        if known[inp] is None:
            return None
    return evaluate_node(node, known)


# Ops that keep an entry of a 1-D shape vector at its position (TorchScript's expand guard
# Where(Equal(s, -1), 1, s) and its Reshape(s, [-1])); Shape reads no value and ends a path.
KEEP_POSITION = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Floor", "Ceil", "Neg", "Equal", "Where"})
SHAPE_TARGETS = frozenset({"Reshape", "Expand"})


def _next_position(index: GraphIndex, user: onnx.NodeProto, slot: int, position: int | None) -> tuple[bool, int | None]:
    """(followed, the entry's position in `user`'s output) for a value at `position` of an input
    (None: a scalar); not followed when the op mixes entries."""
    op = user.op_type
    if op in KEEP_POSITION:  # element-wise: the entry must not be broadcast over a longer vector
        before, after = index.shape(user.input[slot]), index.shape(user.output[0])
        return before is not None and before == after, position
    if op == "Unsqueeze" and position is None:
        return True, 0
    if op == "Squeeze" and position == 0:
        return True, None
    if op == "Reshape" and slot == 0 and position is not None:
        target = index.const(user.input[1])
        return (target is not None and target.tolist() == [-1]), position
    if op == "Concat" and position is not None:
        offset = 0
        for inp in user.input[:slot]:
            shape = index.shape(inp)
            if shape is None or len(shape) != 1 or shape[0] is None:
                return False, None
            offset += int(shape[0])
        return True, offset + position
    return False, None


def size_sinks(index: GraphIndex, name: str, tensor: str) -> list[tuple[str, int]] | None:
    """Where the size held in `name` (a Gather of `tensor`'s shape) ends up, when it is only
    shape arithmetic: the (Reshape/Expand label, target entry) pairs it reaches ([] when it
    feeds only the starts/ends of Slices of `tensor`); None when anything else reads it."""
    start = 0 if index.rank(name) == 1 else None
    todo, seen, sinks = [(name, start)], set(), []
    while todo:
        current, position = todo.pop()
        if (current, position) in seen:
            continue
        seen.add((current, position))
        if current in index.graph_outputs:
            return None
        for use in index.uses.get(current, []):
            user = use.node
            if user.op_type == "Slice" and use.index in (1, 2) and user.input[0] == tensor:
                continue
            if user.op_type == "Shape":
                continue
            if user.op_type in SHAPE_TARGETS and use.index == 1 and position is not None:
                sinks.append((index.label(user), position))
                continue
            followed, after = _next_position(index, user, use.index, position)
            if not followed or len(user.output) != 1:
                return None
            todo.append((user.output[0], after))
    return list(dict.fromkeys(sinks))
