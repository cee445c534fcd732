"""Values computed at run time from the size of a unit axis: TorchScript's chunk point (Shape ->
Gather -> Add/Div/Mul -> Slice starts/ends), evaluated at analysis time so the Slice is read as a
constant window, and the sizes of `repeat_kv` (Shape -> Gather -> [Mul] -> Concat -> Expand /
Reshape targets). Both are rewritten as constants after pruning."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import FOLDABLE, GraphIndex, evaluate_node, get_attr

# Shape arithmetic between the axis size and a Slice bound.
ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Unsqueeze", "Squeeze", "Concat", "Identity", "Floor", "Ceil", "Neg"})


def slice_bound(value: int, length: int) -> int:
    """A Slice start or end (step 1) as a position in [0, length]: negative counts from the end."""
    return max(0, min(length, value + length if value < 0 else value))


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
    return evaluate_node(node, known, index.opset)


# Shape arithmetic of a computed Pad (TF-"same" padding) and of TorchScript's F.pad layout
# (Concat with zeros, Reshape [-1, 2], reversed Slice, Transpose, Reshape [-1]).
STATIC = FOLDABLE | {"Max", "Min", "Abs", "Mod"}


def static_value(index: GraphIndex, name: str, memo: dict[str, np.ndarray | None] | None = None, depth: int = 0) -> np.ndarray | None:
    """The value of `name` at the analysis's static shapes, when it is computed only from
    constants and Shape of tensors whose shape is known (TF-"same" pads from the spatial sizes);
    None otherwise. Only Pad reads it: the value stays computed at run time, and a size of a
    units' axis cannot reach it (the Shape rule pins the space then)."""
    memo = {} if memo is None else memo
    if name in memo:
        return memo[name]
    value = index.const(name)
    node = index.producer.get(name)
    if value is None and node is not None and depth <= 32 and len(node.output) == 1:
        if node.op_type == "Shape":
            shape, rank = index.shape(node.input[0]), index.rank(node.input[0])
            if shape is not None and None not in shape:
                start, end = get_attr(node, "start", 0), get_attr(node, "end", rank)
                value = np.array(shape[slice(start, end)], dtype=np.int64)
        elif node.op_type in STATIC and node.domain in ("", "ai.onnx"):
            known = {i: static_value(index, i, memo, depth + 1) for i in dict.fromkeys(i for i in node.input if i)}
            if known and all(v is not None for v in known.values()):
                value = evaluate_node(node, known, index.opset)
    memo[name] = value
    return value


# Ops that keep an entry of a 1-D shape vector at its position (TorchScript's expand guard
# Where(Equal(s, -1), 1, s)); Shape reads no value and ends a path.
KEEP_POSITION = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Floor", "Ceil", "Neg", "Equal", "Where"})
SHAPE_TARGETS = frozenset({"Reshape", "Expand"})
SCALAR = -1  # the entry is a scalar, not a position of a vector
DIVISOR = -2  # a size_sinks "entry": the sink is a Div whose divisor (input 1) is the axis size


def _picked(indices: list[int], position: int, scalar: bool) -> list[int] | None:
    """Where a Gather/Slice of a shape vector puts entry `position` ([] when it drops it)."""
    hits = [i for i, k in enumerate(indices) if k == position]
    if len(hits) > 1:
        return None
    return [SCALAR if scalar else hits[0]] if hits else []


def _moved_entry(index: GraphIndex, user: onnx.NodeProto, slot: int, position: int) -> list[int] | None:
    """Positions in `user`'s output of the value at `position` of input `slot` ([]: the value is
    not read; None: the op mixes it with other entries)."""
    op, shape = user.op_type, index.shape(user.input[slot])
    length = None if shape is None or len(shape) != 1 else shape[0]
    if op in KEEP_POSITION:  # element-wise: the entry must not be broadcast over a longer vector
        return [position] if shape is not None and shape == index.shape(user.output[0]) else None
    if op == "Unsqueeze" and position == SCALAR:
        return [0]
    if op == "Squeeze" and position == 0 and length == 1:
        return [SCALAR]
    if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin") and position == 0 and length == 1:
        return [0 if get_attr(user, "keepdims", 1) else SCALAR]
    if op == "Reshape" and slot == 0 and position != SCALAR:
        return [position] if np.array_equal(index.const(user.input[1]), [-1]) else None
    if op == "Gather" and slot == 0 and position != SCALAR and get_attr(user, "axis", 0) == 0 and index.is_constant(user.input[1]):
        picks = np.asarray(index.const(user.input[1]))
        return None if length is None else _picked([int(k) % length for k in picks.reshape(-1)], position, picks.ndim == 0)
    if op == "Slice" and slot == 0 and position != SCALAR and length is not None and all(index.is_constant(i) for i in user.input[1:3]):
        steps = index.const(user.input[4]) if len(user.input) > 4 and user.input[4] else np.ones(1)
        if steps.tolist() != [1]:
            return None
        lo, hi = (int(index.const(user.input[k]).reshape(-1)[0]) for k in (1, 2))
        lo, hi = (slice_bound(v, length) for v in (lo, hi))
        return [position - lo] if lo <= position < hi else []
    if op == "Concat" and position != SCALAR:
        offset = 0
        for inp in user.input[:slot]:
            before = index.shape(inp)
            if before is None or len(before) != 1 or before[0] is None:
                return None
            offset += int(before[0])
        return [offset + position]
    return None


def size_sinks(index: GraphIndex, name: str, tensor: str, position: int, size: int | None = None) -> tuple[list[tuple[str, int]], str, str]:
    """Where entry `position` of the shape vector `name` (Shape of `tensor`: the size of its
    units' axis) ends up, when only shape arithmetic reads it: the (Reshape/Expand label, target
    entry) pairs it reaches (none when it feeds only the starts/ends of Slices of `tensor`), and,
    when something else takes it, the reader of `name` on that path and the op it reaches.
    A Div by the axis's `size` (B x heads / heads = B, Bloom's merge_heads) ends a path as the
    pair (Div label, DIVISOR): its divisor is rewritten as the kept size."""
    todo, seen, sinks = [(name, position, "")], set(), []
    while todo:
        current, position, reader = todo.pop()
        if (current, position) in seen:
            continue
        seen.add((current, position))
        if current in index.graph_outputs:
            return sinks, reader, f"graph output '{current}'"
        for use in index.uses.get(current, []):
            user = use.node
            where = reader or f"{user.op_type} '{index.label(user)}'"
            if user.op_type == "Slice" and use.index in (1, 2) and user.input[0] == tensor or user.op_type == "Shape":
                continue
            if user.op_type in SHAPE_TARGETS and use.index == 1 and position != SCALAR:
                sinks.append((index.label(user), position))
                continue
            if user.op_type == "Resize" and use.index == 3 and user.input[0] == tensor and entry_origin(index, current, position) == (tensor, position):
                continue  # interpolate(size=...) keeping the tensor's own size on the units' axis: it follows the pruning
            divisor = index.const(user.input[1]) if user.op_type == "Div" and use.index == 0 and len(user.input) > 1 else None
            if size is not None and divisor is not None and divisor.size == 1 and int(divisor.reshape(-1)[0]) == size:
                sinks.append((index.label(user), DIVISOR))
                continue
            moved = _moved_entry(index, user, use.index, position)
            if moved is None or len(user.output) != 1:
                return sinks, where, f"{user.op_type} '{index.label(user)}'"
            todo.extend((user.output[0], p, where) for p in moved)
    return list(dict.fromkeys(sinks)), "", ""


def entry_origin(index: GraphIndex, name: str, position: int, depth: int = 0) -> tuple[str, int] | None:
    """(tensor, axis) when entry `position` of the shape vector `name` (SCALAR: `name` is a
    scalar) is that tensor's size on that axis, read by Shape and only moved around (Slice,
    Gather, Concat, Unsqueeze, Cast: torch's flatten(2) target Concat(Slice(Shape(x), 0, 2),
    [-1])); None for anything computed or unknown."""
    node = index.producer.get(name)
    if node is None or depth > 16 or len(node.output) != 1:
        return None
    op = node.op_type
    if op == "Shape" and position != SCALAR:
        rank = index.rank(node.input[0])
        start = get_attr(node, "start", 0)
        return None if rank is None else (node.input[0], (start % rank if start else 0) + position)
    if op in ("Cast", "Identity"):
        return entry_origin(index, node.input[0], position, depth + 1)
    if op == "Unsqueeze" and position == 0 and index.rank(node.input[0]) == 0:
        return entry_origin(index, node.input[0], SCALAR, depth + 1)
    if op == "Squeeze" and position == SCALAR:
        return entry_origin(index, node.input[0], 0, depth + 1)
    if op == "Gather" and get_attr(node, "axis", 0) == 0 and index.is_constant(node.input[1]):
        picks = np.asarray(index.const(node.input[1])).reshape(-1)
        length = vector_length(index, node.input[0])
        k = int(picks[0 if position == SCALAR else position]) if position < picks.size else None
        return None if k is None or length is None else entry_origin(index, node.input[0], k % length, depth + 1)
    if op == "Slice" and position != SCALAR and all(index.is_constant(i) for i in node.input[1:3]):
        steps = index.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
        length = vector_length(index, node.input[0])
        if steps.tolist() != [1] or length is None:
            return None
        lo = slice_bound(int(index.const(node.input[1]).reshape(-1)[0]), length)
        return entry_origin(index, node.input[0], lo + position, depth + 1)
    if op == "Concat" and position != SCALAR:
        offset = 0
        for inp in node.input:
            length = vector_length(index, inp)
            if length is None:
                return None
            if position < offset + length:
                return entry_origin(index, inp, position - offset, depth + 1)
            offset += length
    return None


def vector_length(index: GraphIndex, name: str) -> int | None:
    """Entries of a 1-D shape vector (a constant's size, else its inferred length)."""
    value = index.const(name)
    if value is not None:
        return int(value.size)
    shape = index.shape(name)
    return int(shape[0]) if shape is not None and len(shape) == 1 and shape[0] is not None else None
