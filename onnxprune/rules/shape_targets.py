"""Shape values that hold a unit count: where a Reshape/Expand target's entry comes from (to
rewrite it), and Shape nodes that read the size of a unit axis (which pins)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr
from ..placement import Placement
from ..spaces import ShapeUpdate
from .registry import Effect, Pin, SizeFollows, SizeRead, carries
from .shape_values import DIVISOR, SCALAR, entry_origin, size_sinks, static_value, vector_length


class EntrySource(NamedTuple):
    """Where a target entry is stored: input `slot` of node `holder`, index `position` there
    (-1: a scalar). `computed`: that input is computed at run time (TorchScript's Shape ->
    Gather -> Unsqueeze), so the rewrite replaces it with a constant; `guarded`: the target is
    read through TorchScript's expand guard Where(Equal(s, -1), 1, s)."""

    holder: str
    slot: int
    position: int
    computed: bool = False
    guarded: bool = False
    nested: bool = False  # in a Concat that only the target's own Concat reads: edited in place


def shape_update(index: GraphIndex, node: onnx.NodeProto, position: int, block: int, tensor: str,
                 layout: Placement | None = None) -> list[Effect]:
    """Where the Reshape/Expand target's entry for the unit axis comes from, to rewrite it;
    entries that follow the pruning by themselves need nothing (Reshape 0/-1, Expand 1) or a
    check (the size of an axis read by Shape, when that axis carries the units as the output
    does at `layout`: torch's flatten(2), nn.MultiheadAttention's view back to [B, H, ..])."""
    label = index.label(node)
    automatic = {-1, 1} if node.op_type == "Expand" else ({-1} if get_attr(node, "allowzero", 0) else {0, -1})
    target = index.const(node.input[1])
    if target is not None:  # stored or folded (tf2onnx's Cast of a constant): the target gets a new constant
        return [] if int(target[position]) in automatic else [ShapeUpdate(label, 1, position, block, tensor)]
    source = _shape_source(index, node.input[1], position)
    origin = entry_origin(index, node.input[1], position) if source is None and layout is not None else None
    if origin is not None:
        return [SizeFollows(origin[0], origin[1], layout, f"{node.op_type} '{label}' target entry {position}")]
    if source is None:
        return [Pin(f"{node.op_type} '{label}' target entry {position} is computed at run time; onnxprune cannot rewrite it")]
    holder = index.node(source.holder)
    if not source.computed:  # an entry that follows the units by itself needs no edit, guarded or not
        value = index.const(holder.input[source.slot])
        if int(value[()] if source.position < 0 else value[source.position]) in automatic:
            return []
    if source.guarded and any(-1 in np.atleast_1d(index.const(i)).tolist() for i in holder.input if index.is_constant(i)):
        return [Pin(f"{node.op_type} '{label}' target keeps axes with -1 behind a computed guard")]
    via = "" if source.nested else label  # a shared target Concat or batch x heads product: each Reshape edits its own copy
    stored = index.const(holder.input[source.slot])
    dtype = _value_dtype(index, holder.input[source.slot]) if source.computed else stored.dtype.name
    outer = index.producer.get(node.input[1])
    stored_entries = [i for n in (holder, outer) if n is not None and n.op_type == "Concat" for i in n.input if index.is_constant(i)]
    infer = source.computed and node.op_type == "Reshape" and not any(-1 in np.atleast_1d(index.const(i)).tolist() for i in stored_entries)
    return [ShapeUpdate(source.holder, source.slot, source.position, block, tensor, via, dtype, infer)]


def _value_dtype(index: GraphIndex, name: str) -> str:
    """The integer type of a computed shape value: the last Cast before it, a constant it is
    combined with, or Shape's int64."""
    node = index.producer.get(name)
    while node is not None:
        if node.op_type == "Cast":
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(get_attr(node, "to"))).name
        if node.op_type in ("Add", "Sub", "Mul", "Div"):
            known = [index.const(i) for i in node.input if index.is_constant(i)]
            if known:
                return known[0].dtype.name
        if node.op_type == "Shape" or not node.input:
            break
        node = index.producer.get(node.input[0])
    return "int64"


def _is_constant_node(index: GraphIndex, name: str) -> bool:
    producer = index.producer.get(name)
    return producer is not None and producer.op_type == "Constant"


def _is_stored(index: GraphIndex, name: str) -> bool:
    return index.is_constant(name) and (name in index.initializer_names or _is_constant_node(index, name))


def _unguarded(index: GraphIndex, name: str) -> tuple[str, bool]:
    """The shape behind TorchScript's expand guard Where(Equal(s, -1), ConstantOfShape, s) and
    its Reshape(s, [-1]); (name, whether a guard was passed)."""
    node = index.producer.get(name)
    if node is None or node.op_type != "Where" or len(node.input) != 3:
        return name, False
    ones = index.producer.get(node.input[1])
    if ones is None or ones.op_type != "ConstantOfShape":
        return name, False
    name = node.input[2]
    flat = index.producer.get(name)
    if flat is not None and flat.op_type == "Reshape" and np.array_equal(index.const(flat.input[1]), [-1]):
        name = flat.input[0]
    return name, True


def _shape_source(index: GraphIndex, name: str, position: int) -> EntrySource | None:
    """Where entry `position` of a shape built by Concat / Unsqueeze / Cast is stored: a constant
    (TorchScript's view(B, S, heads, d)) or a computed one-entry input (view(B, T, C), C read
    from a shape; the sizes of repeat_kv's expand)."""
    name, guarded = _unguarded(index, name)
    node = index.producer.get(name)
    while node is not None and node.op_type in ("Cast", "Identity"):
        name, node = node.input[0], index.producer.get(node.input[0])
    if node is None or node.op_type != "Concat":
        return None
    offset = 0
    for slot, inp in enumerate(node.input):
        length = vector_length(index, inp)
        if length is None:
            return None
        if offset <= position < offset + length:
            inner = index.producer.get(inp)
            if inner is not None and inner.op_type == "Unsqueeze" and index.is_constant(inner.input[0]):
                if index.const(inner.input[0]).ndim == 0:
                    return EntrySource(index.label(inner), 0, -1, guarded=guarded)
            if _is_stored(index, inp):
                return EntrySource(index.label(node), slot, position - offset, guarded=guarded)
            if inner is not None and inner.op_type == "Concat" and not guarded and len(index.uses.get(inp, [])) == 1 == len(index.uses.get(name, [])):
                source = _shape_source(index, inp, position - offset)  # unflatten(-1, (3, E)): Concat(shape[:-1], Concat([3], E))
                return None if source is None else source._replace(nested=True)
            folded = _batch_fold(index, inp) if length == 1 else None
            if folded is not None:
                return folded
            if length == 1:
                return EntrySource(index.label(node), slot, 0, computed=True, guarded=guarded)
            return None
        offset += length
    return None


def shape_chain(index: GraphIndex, target: onnx.NodeProto, holders: set[int]) -> list[onnx.NodeProto]:
    """The nodes a copy of `target`'s shape computation repeats to edit the `holders` (node ids,
    `ShapeUpdate.via`), in graph order: the Concat that builds the target (past Cast, Identity and
    the expand guard, as `_shape_source` finds it) and every node between it and a holder."""
    name, _ = _unguarded(index, target.input[1])
    top = index.producer.get(name)
    while top is not None and top.op_type in ("Cast", "Identity"):
        top = index.producer.get(top.input[0])
    leads: dict[int, bool] = {}

    def walk(node: onnx.NodeProto, depth: int) -> bool:
        if id(node) not in leads:
            leads[id(node)] = id(node) in holders
            inputs = [p for p in (index.producer.get(i) for i in node.input if i) if p is not None]
            if depth < 16 and node.op_type != "Shape" and any([walk(p, depth + 1) for p in inputs]):  # every branch
                leads[id(node)] = True
        return leads[id(node)]

    if top is not None:
        walk(top, 0)
    return [n for n in index.nodes if leads.get(id(n))]


def _batch_fold(index: GraphIndex, name: str) -> EntrySource | None:
    """A one-entry shape value (Unsqueeze/Reshape/Cast of) Mul(b, c), b computed and 1 at the
    analysis's batch of 1, c a constant: heads folded into the batch, view(B * H, ..) (Bloom,
    nn.MultiheadAttention). Its constant factor c is the entry to rewrite."""
    node = index.producer.get(name)
    while node is not None and node.op_type in ("Unsqueeze", "Reshape", "Cast", "Identity"):
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Mul" or len(node.input) != 2:
        return None
    for slot in (0, 1):
        factor, other = node.input[slot], node.input[1 - slot]
        value = index.const(factor)
        if value is not None and value.size == 1 and not index.is_constant(other):
            batch = static_value(index, other)
            if batch is not None and batch.size == 1 and int(batch.reshape(-1)[0]) == 1:
                return EntrySource(index.label(node), slot, SCALAR if value.ndim == 0 else 0)
    return None


@carries("Shape")
def shape_reader(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Shape only reads sizes: fine as long as the units' axis size, when read, only sets Slice
    bounds of the tensor or Reshape/Expand target entries that carry the units (both rewritten
    as constants); TorchScript's view(x.size(0), x.size(1), heads, d) reads other sizes."""
    label = index.label(node)
    rank = index.rank(tensor)
    if rank is None:
        return [Pin(f"Shape '{label}' of a tensor of unknown rank")]
    start, end = get_attr(node, "start", 0) % rank if get_attr(node, "start", 0) else 0, get_attr(node, "end", rank)
    end = end % rank if end < 0 else min(end, rank)
    if not start <= placement.axis < end:
        return []
    sinks, reader, blocker = size_sinks(index, node.output[0], tensor, placement.axis - start, placement.size)
    if blocker:  # TorchScript's chunk point, repeat_kv's sizes, Tensordot's shapes pass (shape_values.py)
        into = "" if blocker == reader else f" into {blocker}"
        return [Pin(f"Shape '{label}' reads the size of the units' axis ({reader}){into}")]
    return [ShapeUpdate(target, 1, SCALAR, placement.block, tensor) if position == DIVISOR else SizeRead(label, target, position)
            for target, position in sinks]
