"""Index moves written as one Gather on the loaded copy, before the analysis: ShuffleNet's
channel shuffle (a permutation) and attention's `repeat_kv` (each KV head repeated for the
query heads of its group). A Gather with constant indices says per position which unit
it holds, so the op rules can carry units of several spaces through it (`rules/slicing.py`)
and the rewrite can drop any of them, where the grouped views could only lose the same count
from every group."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import GraphIndex, get_attr
from .rules.shapes import static

# (first node, last node, axis, indices): the nodes from first to last become one Gather
Found = tuple[onnx.NodeProto, onnx.NodeProto, int, np.ndarray]


def moves_as_gathers(model: onnx.ModelProto, index: GraphIndex, varied: Callable[[], GraphIndex]) -> bool:
    """Replace every channel shuffle and repeat_kv with a Gather (in place); whether any was.
    `varied` gives the index at larger dynamic input dims: only an axis whose size does not
    follow them is taken (the indices are fixed). The replaced nodes are left unread."""
    graph = model.graph
    found = [f for f in (_shuffle(index, n) if n.op_type == "Reshape" else _repeat(index, n) if n.op_type == "Unsqueeze" else None
                         for n in graph.node) if f]
    if found:
        other = varied()
        found = [f for f in found if _fixed(index, other, f)]
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    for first, last, axis, picks in found:
        name = f"{last.output[0]}_picks"
        while name in taken:
            name += "_"
        taken.add(name)
        graph.initializer.add().CopyFrom(numpy_helper.from_array(picks, name))
        gather = onnx.helper.make_node("Gather", [first.input[0], name], [last.output[0]], name=f"{index.label(last)}_gather", axis=axis)
        position = list(graph.node).index(last)
        last.output[0] = f"{name}_unread"  # dropped as dead with the nodes before it
        graph.node.insert(position, gather)
    return bool(found)


def _fixed(index: GraphIndex, other: GraphIndex, found: Found) -> bool:
    """The sizes of the moved axis (and the group axis after it) are the same at other input sizes."""
    first, last, axis, _ = found
    for name, axes in ((first.input[0], (axis,)), (first.output[0], (axis, axis + 1)), (last.output[0], (axis,))):
        here, there = index.shape(name), other.shape(name)
        if there is None or len(there) != len(here) or any(here[a] != there[a] for a in axes):
            return False
    return True


def _only_reader(index: GraphIndex, name: str, op: str) -> onnx.NodeProto | None:
    uses = index.uses.get(name, [])
    ok = len(uses) == 1 and uses[0].node.op_type == op and name not in index.graph_outputs
    return uses[0].node if ok else None


def _static(index: GraphIndex, *names: str) -> list[tuple[int, ...]] | None:
    """Every named tensor's fully known shape, or None."""
    shapes = [static(index, name) for name in names]
    return None if None in shapes else shapes


def _shuffle(index: GraphIndex, first: onnx.NodeProto) -> Found | None:
    """Reshape [.., C, ..] -> [.., g, C/g, ..], Transpose of those two axes, Reshape back:
    output channel j is input channel (j mod g) C/g + j div g."""
    transpose = _only_reader(index, first.output[0], "Transpose")
    last = _only_reader(index, transpose.output[0], "Reshape") if transpose is not None else None
    shapes = _static(index, first.input[0], first.output[0], last.output[0]) if last is not None else None
    if shapes is None:
        return None
    source, grouped, merged = shapes
    if source != merged or len(grouped) != len(source) + 1:
        return None
    axis = next((a for a in range(len(source)) if source[a] != grouped[a]), None)
    if axis is None or axis + 1 >= len(grouped):
        return None
    swapped = list(range(len(grouped)))
    swapped[axis], swapped[axis + 1] = axis + 1, axis
    groups, per_group = grouped[axis], grouped[axis + 1]
    if list(get_attr(transpose, "perm") or []) != swapped or groups * per_group != source[axis] or grouped[axis + 2:] != source[axis + 1:] \
            or min(groups, per_group) < 2:
        return None
    position = np.arange(groups * per_group)
    return first, last, axis, (position % groups) * per_group + position // groups


def _repeat(index: GraphIndex, first: onnx.NodeProto) -> Found | None:
    """repeat_kv: Unsqueeze [.., kv, ..] -> [.., kv, 1, ..], Expand to [.., kv, rep, ..], Reshape
    to [.., kv x rep, ..]: query head j reads KV head j div rep. The query heads become units;
    the one KV head of multi-query attention (Falcon) is kept (`Lock`), grouped-query KV heads
    go with the last query head that reads them (`spaces.DerivedFrom`, docs/design.md)."""
    expand = _only_reader(index, first.output[0], "Expand")
    last = _only_reader(index, expand.output[0], "Reshape") if expand is not None else None
    shapes = _static(index, first.input[0], first.output[0], expand.output[0], last.output[0]) if last is not None else None
    if shapes is None:
        return None
    source, inserted, expanded, merged = shapes
    if len(inserted) != len(source) + 1 or len(merged) != len(source):
        return None
    axis = next((a for a in range(len(source)) if source[a] != merged[a]), None)
    if axis is None:
        return None
    heads, rep = source[axis], expanded[axis + 1] if axis + 1 < len(expanded) else 0
    if inserted != (*source[:axis + 1], 1, *source[axis + 1:]) or expanded != (*source[:axis + 1], rep, *source[axis + 1:]) \
            or merged != (*source[:axis], heads * rep, *source[axis + 1:]) or rep < 2:
        return None
    return first, last, axis, np.repeat(np.arange(heads), rep)
