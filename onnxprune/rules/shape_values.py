"""Values computed at run time from the size of a unit axis (TorchScript's chunk point:
Shape -> Gather -> Add/Div/Mul -> Slice starts/ends): evaluated at analysis time so the Slice is
read as a constant window, and rewritten as constants after pruning."""

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


def feeds_only_slice_bounds(index: GraphIndex, name: str, tensor: str) -> bool:
    """Whether `name` and the shape arithmetic after it reach only the starts/ends of Slices of
    `tensor` (which the analysis reads, and the rewrite replaces, as constants)."""
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in index.graph_outputs:
            return False
        for use in index.uses.get(current, []):
            user = use.node
            if user.op_type == "Slice" and use.index in (1, 2) and user.input[0] == tensor:
                continue
            if user.op_type not in ARITHMETIC or len(user.output) != 1:
                return False
            todo.append(user.output[0])
    return True
