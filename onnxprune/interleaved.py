"""Fused projections whose parts are interleaved by group: Falcon's new decoder architecture views
its fused `query_key_value` output as [..., groups, members, head] (each KV group's query heads,
then its key head and its value head) and cuts the members axis (a Slice for the queries, a Gather
each for the key and the value). Found here, with the Reshapes around the cuts checked to keep the
leading axes (batch, sequence) at every run, so `unfuse` can write one projection per part whose
weight columns are gathered from the interleaved layout (docs/design.md, "One fused QKV
projection with grouped-query attention")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx

from .graph import GraphIndex, get_attr
from .rules.shape_values import slice_bound
from .rules.slicing import cut_windows

MAX_DEPTH = 16  # shape arithmetic followed back from a Reshape target


class Lead(NamedTuple):
    """A shape entry equal to the size of the fused output's leading axis `axis` at every run."""

    axis: int


Entry = int | Lead


@dataclass(frozen=True)
class Part:
    """One part of a fused projection: the output columns it takes, in order, and the tensors it
    writes, each as a Reshape of the part's projection to a constant target (None: the
    projection's output itself)."""

    columns: np.ndarray
    views: tuple[tuple[str, tuple[int, ...] | None], ...]


@dataclass(frozen=True)
class Layout:
    """The grouped view of a fused output: the Reshapes that make it and its (groups, members, head)."""

    chain: tuple[onnx.NodeProto, ...]
    groups: int
    members: int
    head: int


def interleaved_parts(index: GraphIndex, tensor: str, width: int, sources: tuple[str, ...]) -> tuple[list[onnx.NodeProto], list[Part]] | None:
    """The nodes to replace and the parts of a fused output `tensor` (`width` columns) that
    Reshapes view as [..., groups, members, head] and only Slices, Gathers and Splits of the
    members axis read, in disjoint sets of members; None for any other layout. `sources`: tensors
    with the same leading axes (the projection's input; its bias Add's input)."""
    shape = index.shape(tensor)
    if shape is None or None in shape or shape[-1] != width:
        return None
    lead = len(shape) - 1
    known = {tensor: (width,)} | {s: tuple(index.shape(s)[lead:]) for s in sources if _leads_with(index, s, lead)}
    layout = _grouped_view(index, tensor, lead, known)
    if layout is None:
        return None
    view = layout.chain[-1].output[0]
    cuts = [_members_cut(index, use.node, lead, layout) for use in index.uses.get(view, []) if use.index == 0]
    if not cuts or None in cuts or len(cuts) != len(index.uses[view]) or view in index.graph_outputs:
        return None
    picked = [(out, members, kept) for cut in cuts for out, members, kept in cut]
    flat = [m for _, members, _ in picked for m in members]
    if len(set(flat)) != len(flat):
        return None
    for out, members, kept in picked:
        known[out] = (layout.groups, len(members), layout.head) if kept else (layout.groups, layout.head)
    replaced = [*layout.chain, *(use.node for use in index.uses[view])]
    parts = []
    for out, members, kept in picked:
        merge = _merging_reshape(index, out, lead, known) if kept else None
        parts.append(_part(index, out, members, kept, merge, lead, layout))
        replaced += [merge] if merge is not None else []
    return replaced, parts


def _leads_with(index: GraphIndex, name: str, lead: int) -> bool:
    """Whether `name` has `lead` leading axes and one more of a known size."""
    shape = index.shape(name)
    return shape is not None and len(shape) == lead + 1 and shape[-1] is not None


def _grouped_view(index: GraphIndex, tensor: str, lead: int, known: dict[str, tuple[int, ...]]) -> Layout | None:
    """The chain of Reshapes, each its input's only reader, from the fused output to a view of
    rank lead + 3 (the last one read by something else than one Reshape); `known` learns the
    trailing sizes of each view."""
    chain: list[onnx.NodeProto] = []
    view = tensor
    while len(uses := index.uses.get(view, [])) == 1 and view not in index.graph_outputs:
        node = uses[0].node
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or uses[0].index != 0:
            break
        trailing = reshaped(index, node, lead, known)
        if trailing is None:
            return None
        chain.append(node)
        view = node.output[0]
        known[view] = trailing
    if not chain or len(known[view]) != 3:
        return None
    return Layout(tuple(chain), *known[view])


def _members_cut(index: GraphIndex, node: onnx.NodeProto, lead: int, layout: Layout) -> list[tuple[str, tuple[int, ...], bool]] | None:
    """(output, members, whether the members axis stays) of a Slice (step 1), a Gather or a
    Split of the members axis (lead + 1) with constant bounds; None for any other reader."""
    rank, axis, count = lead + 3, lead + 1, layout.members
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gather" and get_attr(node, "axis", 0) % rank == axis and (picks := index.const(node.input[1])) is not None:
        members = [int(k) % count for k in np.atleast_1d(picks).tolist() if -count <= int(k) < count]
        if picks.ndim > 1 or len(members) != picks.size or not members:
            return None
        return [(node.output[0], tuple(members), picks.ndim == 1)]
    windows = cut_windows(index, node, rank, count, axis)
    if windows is None or (node.op_type == "Slice" and windows[0][2] <= windows[0][1]):
        return None
    return [(out, tuple(range(start, stop)), True) for out, start, stop in windows]


def _merging_reshape(index: GraphIndex, tensor: str, lead: int, known: dict[str, tuple[int, ...]]) -> onnx.NodeProto | None:
    """The one Reshape reading a part [..., groups, members, head] that merges it into heads,
    [..., groups x members, head], keeping the leading axes (Falcon's query view), if any."""
    reshapes = [use.node for use in index.uses.get(tensor, []) if use.node.op_type == "Reshape" and use.index == 0]
    if len(reshapes) != 1 or reshapes[0].domain not in ("", "ai.onnx"):
        return None
    groups, members, head = known[tensor]
    trailing = reshaped(index, reshapes[0], lead, known)
    return reshapes[0] if trailing == (groups * members, head) else None


def _part(index: GraphIndex, out: str, members: tuple[int, ...], kept: bool, merge: onnx.NodeProto | None, lead: int,
          layout: Layout) -> Part:
    """The part's columns (group by group, its members' heads in order) and the tensors it writes:
    its heads [..., groups x members, head] (a merging Reshape's output, or a Gather's of one
    member) and, where other nodes read it, the cut's own [..., groups, members, head]."""
    heads = np.arange(layout.head)
    columns = ((np.arange(layout.groups)[:, None, None] * layout.members + np.asarray(members)[None, :, None]) * layout.head + heads).reshape(-1)
    keep = (0,) * lead
    views: list[tuple[str, tuple[int, ...] | None]] = []
    if merge is not None:
        views.append((merge.output[0], (*keep, -1, layout.head)))
    if not kept:
        views.append((out, (*keep, -1, layout.head)))
    elif merge is None or out in index.graph_outputs or any(use.node is not merge for use in index.uses.get(out, [])):
        views.append((out, (*keep, layout.groups, len(members), layout.head)))  # where only the merge's Shape chain read it, dropped as dead
    return Part(columns, tuple(views))


def reshaped(index: GraphIndex, node: onnx.NodeProto, lead: int, known: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The sizes after the leading axes of a Reshape's output, when its input is a `known` tensor
    and its target keeps the `lead` leading axes at every run (each entry copies the input's, or
    is read from the shape of a `known` tensor there) and fixes the others (constants, one -1);
    None otherwise."""
    entries = shape_entries(index, node.input[1], lead, known)
    source = known.get(node.input[0])
    out = index.shape(node.output[0])
    if entries is None or isinstance(entries, (int, Lead)) or source is None or out is None or len(out) != len(entries) or len(entries) <= lead:
        return None
    copies = not get_attr(node, "allowzero", 0)  # a 0 copies the input's size
    if any(e != Lead(i) and not (copies and e == 0 and not isinstance(e, Lead)) for i, e in enumerate(entries[:lead])):
        return None
    trailing = []
    for j, e in enumerate(entries[lead:]):
        if isinstance(e, Lead) or e < -1 or (e == 0 and not copies) or (e == 0 and j >= len(source)):
            return None
        trailing.append(source[j] if e == 0 else e)
    total, fixed = int(np.prod(source)), int(np.prod([e for e in trailing if e != -1]))
    if trailing.count(-1) > 1 or (trailing.count(-1) == 0 and fixed != total) or fixed <= 0 or total % fixed:
        return None
    trailing = [total // fixed if e == -1 else e for e in trailing]
    return tuple(trailing) if tuple(trailing) == tuple(out[lead:]) else None


def shape_entries(index: GraphIndex, name: str, lead: int, known: dict[str, tuple[int, ...]], depth: int = 0) -> list[Entry] | Entry | None:
    """A shape value as entries that hold at every run: constants, and `Lead(i)` for the size of
    the leading axis i of a `known` tensor (Shape -> Gather / Slice -> Unsqueeze -> Concat, Cast);
    a scalar is one entry, not a list. None for anything else."""
    value = index.const(name)
    if value is not None:
        return int(value) if value.ndim == 0 else [int(v) for v in value.reshape(-1)] if value.ndim == 1 else None
    node = index.producer.get(name)
    if node is None or depth > MAX_DEPTH or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if node.op_type == "Shape":
        sizes = known.get(node.input[0])
        if sizes is None:
            return None
        whole = [*(Lead(i) for i in range(lead)), *sizes]
        start, end = get_attr(node, "start", 0), get_attr(node, "end", len(whole))
        return whole[slice(start, end)]
    inputs = [shape_entries(index, i, lead, known, depth + 1) for i in node.input[:1 if node.op_type != "Concat" else None]]
    if any(i is None for i in inputs):
        return None
    return _entries_through(index, node, inputs)


def _entries_through(index: GraphIndex, node: onnx.NodeProto, inputs: list) -> list[Entry] | Entry | None:
    """The entries out of Cast, Identity, (Un)Squeeze of one entry, Concat of vectors, and
    Gather / Slice (step 1) of a vector with constant indices."""
    op, first = node.op_type, inputs[0]
    scalar = isinstance(first, (int, Lead))
    if op in ("Cast", "Identity"):
        return first
    if op == "Unsqueeze":
        return [first] if scalar else None
    if op == "Squeeze":
        return first[0] if not scalar and len(first) == 1 else None
    if op == "Concat":
        return [e for i in inputs for e in i] if not any(isinstance(i, (int, Lead)) for i in inputs) and get_attr(node, "axis", 0) == 0 else None
    if scalar or op not in ("Gather", "Slice") or (op == "Gather" and get_attr(node, "axis", 0) != 0):
        return None
    if op == "Gather":
        picks = index.const(node.input[1])
        if picks is None or picks.ndim > 1 or not all(-len(first) <= int(k) < len(first) for k in picks.reshape(-1)):
            return None
        return first[int(picks)] if picks.ndim == 0 else [first[int(k)] for k in picks]
    bounds = [index.const(i) if i else None for i in node.input[1:5]]
    if any(b is None or b.size != 1 for b in bounds[:2]) or any(b is not None and (b.size != 1 or int(b.reshape(-1)[0]) != (0 if k == 2 else 1))
                                                                 for k, b in enumerate(bounds[2:], start=2)):
        return None  # only the one axis of a vector, step 1
    start, stop = (slice_bound(int(b.reshape(-1)[0]), len(first)) for b in bounds[:2])
    return first[start:stop]
