"""Ops that move the unit axis: Transpose, Reshape/Flatten (split or merge it: heads),
Unsqueeze, Squeeze, Expand. Reached from their output, they map the placement back first."""

from __future__ import annotations

import functools

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr
from ..ops import REDUCE_OPS
from ..placement import Placement
from ..spaces import WindowUpdate
from .registry import Carry, CarryRule, Coarsen, Effect, Pin, axes_input, carries, through
from .shape_targets import shape_update
from .slicing import slice_


def static(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    """The tensor's shape when every dimension is known."""
    shape = index.shape(name)
    return None if shape is None or None in shape else tuple(int(d) for d in shape)


def map_reshape(index: GraphIndex, node: onnx.NodeProto, placement: Placement, from_shape, to_shape,
                forward: bool = False) -> tuple[Placement | None, list[Effect]]:
    """Where the units land when a tensor of `from_shape` is reshaped to `to_shape`: the unit
    axis may be split (heads [.., H] -> [.., heads, d]) or merged with the axes after it.
    `forward`: from the node's input to its output (a fused projection's parts are recognised
    only then: backwards, repeat_kv's [.., kv x rep, ..] -> [.., kv, rep, ..] looks the same)."""
    label = f"{node.op_type} '{index.label(node)}'"
    if from_shape is None or to_shape is None:
        return None, [Pin(f"{label} has a shape onnxprune cannot read")]
    a = placement.axis
    outer, inner = int(np.prod(from_shape[:a], dtype=np.int64)), int(np.prod(from_shape[a + 1:], dtype=np.int64))
    if placement.repeats > 1:  # copies side by side: split apart again (followed backwards), or kept whole
        split = _split_copies(placement, outer, inner, to_shape)
        if split is not None:
            return split, []
        moved, effects = _moved(label, placement, outer, inner, from_shape, to_shape)
        return (moved, []) if moved is not None else (None, [Pin(f"{label} splits the copies of the units another way")])
    return _moved(label, placement, outer, inner, from_shape, to_shape, (index, node.output[0]) if forward else None)


def _moved(label: str, placement: Placement, outer: int, inner: int, from_shape, to_shape,
           out: tuple[GraphIndex, str] | None = None) -> tuple[Placement | None, list[Effect]]:
    """The unit axis kept, split into heads, or merged with the axes next to it."""
    span = placement.block * inner  # elements of one unit slot within one outer block
    candidates = [k for k in range(len(to_shape)) if int(np.prod(to_shape[:k], dtype=np.int64)) == outer and to_shape[k] != 1]
    if not candidates:
        merged = _merged_with_axes_before(placement, from_shape, to_shape)
        return (merged, []) if merged is not None else (None, [Pin(f"{label} mixes the units' axis with the axes before it")])
    k = candidates[0]
    t = int(np.prod(to_shape[k + 1:], dtype=np.int64))
    parts = _fused_parts(placement, span, to_shape, k, out) if out else None
    if parts is not None:
        return parts
    if t % span == 0 and t > span:  # an output index holds several units: use whole groups
        factor = t // span
        effects: list[Effect] = []
        if all(seg.offset % factor == 0 and seg.lo % factor == 0 and (seg.hi - seg.lo) % factor == 0 for seg in placement.segments):
            effects.append(Coarsen(factor, label))
        return None, [*effects, Pin(f"{label} groups units that are not all of this space")]
    if span % t:
        return None, [Pin(f"{label} mixes units with the axes after them")]
    return placement.moved(k, block=span // t, width=placement.width), []


def _fused_parts(placement: Placement, span: int, to_shape, k: int, out: tuple[GraphIndex, str]) -> tuple[Placement | None, list[Effect]] | None:
    """A fused projection split into parts then heads, [.., 3E] -> [.., 3, H, d] (timm's and
    torchvision's qkv before q, k, v = qkv.unbind()), or into parts only, [.., 3E] -> [.., 3, E]
    (nn.MultiheadAttention's packed in_proj, heads split later per part): units become heads
    of d elements (features when there is no head axis), and head h of every part is one unit
    (the parts land on the same positions, which the engine merges as aliases, like a Split's
    fused QKV)."""
    parts = int(to_shape[k])
    if span != placement.block:  # the features are the last axis (a MatMul's), not NCHW channels (YOLOv8's DFL view)
        return None
    if not 1 < parts <= MAX_COPIES or len(to_shape) < k + 2 or placement.count() != placement.width or placement.width % parts:
        return None
    split = len(to_shape) > k + 2  # a head axis after the parts' axis
    if not _unbound(*out, k):  # [.., E] -> [.., H, d] splits heads; Bloom's [.., H, 3, d] has heads first
        return None
    head = int(np.prod(to_shape[k + 2:], dtype=np.int64)) if split else span
    heads = int(to_shape[k + 1]) if split else placement.width // parts
    if span == 1 and head > 1:  # channels first: whole heads
        return None, [Coarsen(head, f"the parts of a fused projection ({parts} x {heads} heads of {head})")]
    if head != span or heads * parts != placement.width:
        return None
    copies = [placement.window(c * heads, (c + 1) * heads) for c in range(parts)]
    if any(copy is None for copy in copies):
        return None
    copies = [copy.moved(k + 1, block=1 if split else span, width=heads) for copy in copies]
    return copies[0], [Carry(out[1], copy) for copy in copies[1:]]


def _unbound(index: GraphIndex, tensor: str, axis: int, depth: int = 0) -> bool:
    """Every reader of `tensor` takes single indices of `axis` (Gather of a scalar, Split into
    pieces of one), maybe after Unsqueeze/Squeeze/Transpose: the axis holds parts (unbind)."""
    uses = index.uses.get(tensor, [])
    if not uses or depth > 8 or tensor in index.graph_outputs:
        return False
    for use in uses:
        node, rank = use.node, index.rank(tensor)
        if use.index != 0 or rank is None:
            return False
        if node.op_type == "Gather":
            picks = index.const(node.input[1])
            if get_attr(node, "axis", 0) % rank != axis or picks is None or picks.ndim != 0:
                return False
        elif node.op_type == "Split":
            sizes = index.const(node.input[1]) if len(node.input) > 1 and node.input[1] else get_attr(node, "split")
            shape = index.shape(tensor)
            ones = shape is not None and len(node.output) == shape[axis] if sizes is None else set(np.atleast_1d(sizes).tolist()) == {1}
            if get_attr(node, "axis", 0) % rank != axis or not ones:
                return False
        elif node.op_type == "Slice":  # qkv[0:1] (paddle2onnx's qkv[0]), squeezed or reshaped later
            if not _takes_one(index, node, tensor, axis):
                return False
        elif node.op_type in ("Unsqueeze", "Squeeze", "Transpose"):
            moved = _output_axis(index, node, axis)
            if moved is None or not _unbound(index, node.output[0], moved, depth + 1):
                return False
        else:
            return False
    return True


def _takes_one(index: GraphIndex, node: onnx.NodeProto, tensor: str, axis: int) -> bool:
    """Whether a Slice keeps exactly one index of `axis` of `tensor` (the Slice rule's window for
    a probe of one-element units on that axis)."""
    shape = index.shape(tensor)
    if shape is None or shape[axis] is None:
        return False
    windows = [e.windows for e in slice_(index, node, tensor, Placement.identity(axis, shape[axis])) if isinstance(e, WindowUpdate)]
    return len(windows) == 1 and [b - a for a, b in windows[0]] == [1]


def _output_axis(index: GraphIndex, node: onnx.NodeProto, axis: int) -> int | None:
    """Where axis `axis` of an Unsqueeze/Squeeze/Transpose's input lands in its output (None
    when it is removed): the op's own rule, applied to a one-unit probe."""
    probe = Placement.identity(axis, 1)
    effects = {"Unsqueeze": unsqueeze, "Squeeze": squeeze, "Transpose": transpose}[node.op_type](index, node, node.input[0], probe)
    carried = [e for e in effects if isinstance(e, Carry) and e.tensor == node.output[0]]
    return carried[0].placement.axis if carried else None


# A unit carried more often is scored as a block of that many elements at a site as wide as
# all its copies (an NHWC 7x7 flatten would be a 49-element unit on a 25k-wide Gram): pinned.
MAX_COPIES = 8


def _merged_with_axes_before(placement: Placement, from_shape, to_shape) -> Placement | None:
    """Axes just before the unit axis merged into it, the units' axis the minor one ([T, N, 2, H]
    -> [T, N, 2H]: a bidirectional LSTM's directions side by side): each unit appears once per
    index of the merged axes."""
    a = placement.axis
    inner = int(np.prod(from_shape[a + 1:], dtype=np.int64))
    for j in range(a - 1, -1, -1):
        copies, before = int(np.prod(from_shape[j:a], dtype=np.int64)), int(np.prod(from_shape[:j], dtype=np.int64))
        if copies > MAX_COPIES:
            return None
        for k in range(len(to_shape)):
            if int(np.prod(to_shape[:k], dtype=np.int64)) != before:
                continue
            if to_shape[k] == copies * from_shape[a] and int(np.prod(to_shape[k + 1:], dtype=np.int64)) == inner:
                return placement.repeated(copies).moved(k, width=placement.width * copies)
            if to_shape[k] == copies * from_shape[a] * inner and int(np.prod(to_shape[k + 1:], dtype=np.int64)) == 1:
                return placement.repeated(copies).moved(k, block=placement.block * inner, width=placement.width * copies)  # [.., 3, H, d] -> [.., 3E]
    return None


def _split_copies(placement: Placement, outer: int, inner: int, to_shape) -> Placement | None:
    """The inverse of `_merged_with_axes_before`: [T, N, 2H] -> [T, N, 2, H] gives the first copy."""
    copies = placement.repeats
    base = placement.width // copies
    first = tuple(s for s in placement.segments if s.offset < base)
    for k in range(len(to_shape)):
        if int(np.prod(to_shape[:k], dtype=np.int64)) != outer * copies:
            continue
        after = int(np.prod(to_shape[k + 1:], dtype=np.int64))
        if to_shape[k] == base * placement.block and after == inner:
            return Placement(k, base, first, placement.block)
        if to_shape[k] == base and after == placement.block * inner:  # a fused projection's parts, then heads
            return Placement(k, base, first, 1)
    return None


def input_placement(index: GraphIndex, node: onnx.NodeProto, out_placement: Placement) -> tuple[Placement | None, list[Effect]]:
    """Inverse of the axis-moving ops, for a tensor reached from its consumer's side."""
    op = node.op_type
    inp, out = node.input[0], node.output[0]
    in_rank, out_rank = index.rank(inp), index.rank(out)
    if in_rank is None or out_rank is None:
        return None, [Pin(f"{op} '{index.label(node)}' has an unknown rank")]
    axis = out_placement.axis
    if op == "Transpose":
        perm = get_attr(node, "perm") or list(range(in_rank))[::-1]
        return out_placement.moved(int(perm[axis])), []
    if op in ("Reshape", "Flatten"):
        return map_reshape(index, node, out_placement, static(index, out), static(index, inp))
    if op == "Expand":
        return (out_placement.moved(axis - (out_rank - in_rank)) if axis >= out_rank - in_rank else None), []
    if op == "Unsqueeze":
        axes = axes_input(index, node)
        removed = [] if axes is None else sorted(a % out_rank for a in axes)
        kept = [i for i in range(out_rank) if i not in removed]
        return (out_placement.moved(kept.index(axis)) if axes is not None and axis in kept else None), []
    if op == "Squeeze" or op in REDUCE_OPS:
        axes = axes_input(index, node)
        shape = index.shape(inp)
        if axes is None and op == "Squeeze" and shape is not None:
            axes = [i for i, d in enumerate(shape) if d == 1]
        if axes is None:
            return None, []
        if op != "Squeeze" and get_attr(node, "keepdims", 1):
            return out_placement, []
        dropped = sorted(a % in_rank for a in axes)
        kept = [i for i in range(in_rank) if i not in dropped]
        return out_placement.moved(kept[axis]), []
    return out_placement, []


def axis_mover(rule: CarryRule) -> CarryRule:
    """Wrap the rule of an op that moves the unit axis: reached from its output, map the
    placement back to the input and apply the rule from there."""

    @functools.wraps(rule)
    def wrapped(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
        if tensor in node.input:
            return rule(index, node, tensor, placement)
        source, effects = input_placement(index, node, placement)
        if source is None:
            return [*effects, Pin(f"{node.op_type} '{index.label(node)}' cannot be followed backwards from '{tensor}'")]
        return effects + rule(index, node, node.input[0], source)

    return wrapped


@carries("Reshape", "Flatten")
@axis_mover
def reshape(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Split or merge the unit axis (DESIGN §3); Reshape targets are rewritten."""
    out_placement, effects = map_reshape(index, node, placement, static(index, tensor), static(index, node.output[0]), forward=True)
    if out_placement is None:
        return effects
    if node.op_type == "Reshape":
        effects += shape_update(index, node, out_placement.axis, out_placement.block, node.output[0], out_placement)
    return effects + through(index.label(node), tensor, node.output[0], placement, out_placement)


@carries("Transpose")
@axis_mover
def transpose(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """The units move to the axis the permutation sends theirs to."""
    rank = index.rank(tensor)
    perm = get_attr(node, "perm") or list(range(rank or 0))[::-1]
    if rank is None or len(perm) != rank:
        return [Pin(f"Transpose '{index.label(node)}' has an unknown rank")]
    return through(index.label(node), tensor, node.output[0], placement, placement.moved(list(perm).index(placement.axis)))


@carries("Unsqueeze")
@axis_mover
def unsqueeze(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Inserted axes before the units' axis shift it."""
    axes, out_rank = axes_input(index, node), index.rank(node.output[0])
    if axes is None or out_rank is None:
        return [Pin(f"Unsqueeze '{index.label(node)}' has computed axes")]
    axis = placement.axis
    for a in sorted(a % out_rank for a in axes):
        if a <= axis:
            axis += 1
    return through(index.label(node), tensor, node.output[0], placement, placement.moved(axis))


@carries("Squeeze")
@axis_mover
def squeeze(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Removed axes before the units' axis shift it; removing the units' axis pins."""
    axes, rank = axes_input(index, node), index.rank(tensor)
    shape = index.shape(tensor)
    if rank is None or (axes is None and shape is None):
        return [Pin(f"Squeeze '{index.label(node)}' has computed axes")]
    removed = [a % rank for a in axes] if axes is not None else [i for i, d in enumerate(shape) if d == 1]
    if placement.axis in removed:
        return [Pin(f"Squeeze '{index.label(node)}' removes the units' axis")]
    moved = placement.moved(placement.axis - sum(a < placement.axis for a in removed))
    return through(index.label(node), tensor, node.output[0], placement, moved)


@carries("Expand")
@axis_mover
def expand(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Expand may add leading axes; it must not broadcast the units' axis."""
    rank, out_rank = index.rank(tensor), index.rank(node.output[0])
    out_shape = index.shape(node.output[0])
    label = index.label(node)
    if rank is None or out_rank is None or out_shape is None:
        return [Pin(f"Expand '{label}' has an unknown shape")]
    axis = placement.axis + out_rank - rank
    if out_shape[axis] not in (None, placement.size):
        return [Pin(f"Expand '{label}' broadcasts the units' axis")]
    effects = shape_update(index, node, axis, placement.block, node.output[0], placement.moved(axis))
    return effects + through(label, tensor, node.output[0], placement, placement.moved(axis))
