"""Concat, Split, Slice, Pad and Gather(ND): a Concat on the unit axis shifts the units (DenseNet,
UNet skips), Split and Slice cut windows of them (their sizes are rewritten), Pad must leave the
unit axis alone, and a Gather carries the units of the axes it does not index."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr
from ..placement import Placement
from ..spaces import DerivedFrom, IndexUpdate, WindowUpdate
from .registry import Carry, Effect, Lock, Pin, Through, carries, slice_param, through
from .shape_values import axis_size_value, slice_bound, static_value


@carries("Concat")
def concat(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """On the unit axis the units move by the widths of the inputs before theirs; along another
    axis (RoPE halves, a KV cache) every input carries the same units."""
    label = index.label(node)
    rank = index.rank(node.output[0])
    widths = []
    for inp in node.input:
        shape = index.shape(inp)
        widths.append(None if shape is None or rank is None else shape[placement.axis])
    if rank is None:
        return [Pin(f"Concat '{label}' has an output of unknown rank")]
    if get_attr(node, "axis", 0) % rank != placement.axis:
        effects: list[Effect] = []
        for inp in node.input:
            if index.is_constant(inp):
                return [*effects, Pin(f"Concat '{label}' joins the units with a constant '{inp}'")]
            effects.append(Carry(inp, placement))
        return effects + through(label, tensor, node.output[0], placement)
    if placement.block > 1:
        return [Pin(f"Concat '{label}' joins along units of {placement.block} elements")]
    if None in widths:
        return [Pin(f"Concat '{label}' has inputs of unknown width")]
    total, offsets = sum(widths), np.cumsum([0, *widths])
    effects = [Through(label)]
    for slot, inp in enumerate(node.input):
        if inp == tensor:
            effects.append(Carry(node.output[0], placement.shifted(int(offsets[slot]), int(total))))
    return effects


def split_windows(index: GraphIndex, node: onnx.NodeProto, width: int) -> list[tuple[int, int]] | None:
    """[start, stop) of each output of a Split of an axis of `width` elements (sizes as an input, an
    attribute, or equal parts), or None when its sizes are not constant or do not add up."""
    sizes = get_attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = index.const(node.input[1])
        if value is None:
            return None
        sizes = value.tolist()
    if sizes is None:
        parts = get_attr(node, "num_outputs", len(node.output))
        chunk = -(-width // parts)
        sizes = [min(chunk, width - i * chunk) for i in range(parts)]
    ends = np.cumsum([0, *sizes])
    if ends[-1] != width:
        return None
    return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def cut_windows(index: GraphIndex, node: onnx.NodeProto, rank: int, width: int, axis: int) -> list[tuple[str, int, int]] | None:
    """(output, start, stop) of a Slice (step 1) or a Split of `axis` (`width` elements) with
    constant bounds, else None (a fused projection's parts: `unfuse`, `interleaved`)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Slice", "Split"):
        return None
    if node.op_type == "Split":
        windows = split_windows(index, node, width) if get_attr(node, "axis", 0) % rank == axis else None
        if windows is None or len(windows) != len(node.output):
            return None
        return [(out, start, stop) for out, (start, stop) in zip(node.output, windows, strict=True) if out]
    bounds = [index.const(name) if name else None for name in node.input[1:5]]
    if len(bounds) < 3 or any(b is None for b in bounds[:3]) or (len(bounds) > 3 and node.input[4] and bounds[3] is None):
        return None  # computed bounds, or none given for the axes (opset < 10's attributes, every axis)
    starts, ends, axes = (np.atleast_1d(b).tolist() for b in bounds[:3])
    steps = np.atleast_1d(bounds[3]).tolist() if len(bounds) > 3 and bounds[3] is not None else [1]
    if len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or steps != [1] or axes[0] % rank != axis:
        return None
    return [(node.output[0], slice_bound(int(starts[0]), width), slice_bound(int(ends[0]), width))]


@carries("Split")
def split(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Each output gets the units inside its window; the windows are rewritten."""
    label = index.label(node)
    rank = index.rank(tensor)
    if rank is None:
        return [Pin(f"Split '{label}' input has an unknown rank")]
    if get_attr(node, "axis", 0) % rank != placement.axis:
        return [Through(label), Carry(node.input[0], placement), *(Carry(out, placement) for out in node.output if out)]
    windows = split_windows(index, node, placement.size)
    if windows is not None and placement.block > 1:  # sizes are in elements: whole units only
        if any(a % placement.block or b % placement.block for a, b in windows):
            windows = None
        else:
            windows = [(a // placement.block, b // placement.block) for a, b in windows]
    if windows is None or len(windows) != len(node.output):
        return [Pin(f"Split '{label}' has sizes onnxprune cannot read")]
    effects: list[Effect] = [WindowUpdate(label, tensor, tuple(windows)), Through(label)]
    for out, (start, stop) in zip(node.output, windows, strict=True):
        part = placement.window(start, stop)
        if out and part is not None:
            effects.append(Carry(out, part))
    return effects


@carries("Slice")
def slice_(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A constant window on the unit axis keeps the units inside it; other axes pass through."""
    label = index.label(node)
    rank = index.rank(tensor)
    consts = [index.const(i) if i else None for i in node.input[1:]]
    if rank is not None and len(consts) > 2 and consts[2] is not None and placement.axis not in [a % rank for a in consts[2].tolist()]:
        return through(label, tensor, node.output[0], placement)  # cuts other axes only (RoPE halves)
    computed = rank is not None and len(consts) >= 2 and any(c is None for c in consts[:2])
    if computed:  # TorchScript's chunk: bounds computed from this axis's size
        consts[:2] = [c if c is not None else axis_size_value(index, i, tensor, placement.axis) for c, i in zip(consts[:2], node.input[1:3], strict=True)]
    if rank is None or len(consts) < 2 or any(c is None for c in consts):
        return [Pin(f"Slice '{label}' has computed or missing starts/ends")]
    starts, ends = consts[0].tolist(), consts[1].tolist()
    axes = consts[2].tolist() if len(consts) > 2 else list(range(len(starts)))
    steps = consts[3].tolist() if len(consts) > 3 else [1] * len(starts)
    axes = [a % rank for a in axes]
    if placement.axis not in axes:
        return through(label, tensor, node.output[0], placement)
    k = axes.index(placement.axis)
    size, block = placement.size, placement.block
    start, stop = (slice_bound(v, size) for v in (starts[k], ends[k]))
    if steps[k] != 1 or stop <= start:
        return [Pin(f"Slice '{label}' on the unit axis has a step other than 1 or is empty")]
    if start % block or stop % block:  # bounds are in elements: whole units only (a chunk of heads)
        return [Pin(f"Slice '{label}' cuts units of {block} elements")]
    start, stop = start // block, stop // block
    bounds = (tuple(starts), tuple(ends)) if computed else None
    dtype = str(consts[0].dtype) if computed else "int64"
    effects: list[Effect] = [WindowUpdate(label, tensor, ((start, stop),), bounds, dtype), Through(label)]
    part = placement.window(start, stop)
    return effects + ([Carry(node.output[0], part)] if part is not None else [])


@carries("Pad")
def pad(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Padding other axes keeps the units; padding the unit axis would add units. Pads computed at
    run time (TorchScript's TF-"same" padding: Shape -> Gather -> arithmetic -> Concat, then F.pad's
    reversed pairs) are read at the analysis's static shapes and stay computed: only their
    entries on the units' axis matter, and those must be 0."""
    label = index.label(node)
    pads = get_attr(node, "pads")
    if pads is None and len(node.input) > 1:
        value = index.const(node.input[1])
        if value is None:
            value = static_value(index, node.input[1])
        pads = None if value is None else np.asarray(value).reshape(-1).tolist()
    rank = index.rank(tensor)
    axes_given = len(node.input) > 3 and node.input[3]
    if pads is None or rank is None or axes_given or len(pads) != 2 * rank:
        return [Pin(f"Pad '{label}' has pads onnxprune cannot read")]
    if pads[placement.axis] or pads[placement.axis + rank]:
        return [Pin(f"Pad '{label}' pads the units' axis")]
    return through(label, tensor, node.output[0], placement)


@carries("Gather")
def gather(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Gather along another axis (a ViT's CLS token x[:, 0], a time step, a fused QKV's part)
    keeps every unit; the indices' axes replace the gathered one. Along the units' axis it
    would pick units (pins)."""
    label, axis = index.label(node), get_attr(node, "axis", 0)
    rank, picks = index.rank(node.input[0]), index.rank(node.input[1])
    if tensor == node.input[1] or rank is None or picks is None:
        return [Pin(f"Gather '{label}' on the unit axis is not supported")]
    axis %= rank
    if placement.axis == axis and (tensor == node.input[0] or picks == 1):
        return _along_units(index, node, tensor, placement)
    if tensor == node.input[0]:
        source = placement
    elif placement.axis < axis or placement.axis >= axis + picks:
        source = placement.moved(placement.axis if placement.axis < axis else placement.axis - picks + 1)
    else:
        return [Pin(f"Gather '{label}' indexes the units' axis")]
    if source.axis == axis:
        return [Pin(f"Gather '{label}' selects along the units' axis")]
    out = source.moved(source.axis if source.axis < axis else source.axis + picks - 1)
    return _gathered_through(index, node, source, out)


def _gathered_through(index: GraphIndex, node: onnx.NodeProto, source: Placement, out: Placement) -> list[Effect]:
    """The units pass from the data (`source`) to the output (`out`) of a Gather(ND) of other
    axes; a constant table of per-unit columns (T5's or Swin's relative bias per head) is sliced."""
    label = index.label(node)
    if index.is_constant(node.input[0]):
        return [Through(label), *slice_param(index, node, 0, source.axis, node.output[0], out, per_element=True), Carry(node.output[0], out)]
    return through(label, node.input[0], node.output[0], source, out)


@carries("GatherND")
def gather_nd(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """GatherND that indexes other axes than the units' (Swin-v2's relative position bias, a
    [positions, heads] table picked by constant position ids) keeps every unit: the axes after
    the indexed ones follow the indices' leading axes. A constant table is sliced per unit."""
    label, batch = index.label(node), get_attr(node, "batch_dims", 0)
    rank, picks = index.rank(node.input[0]), index.shape(node.input[1])
    if tensor == node.input[1] or rank is None or picks is None or picks[-1] is None:
        return [Pin(f"GatherND '{label}' on the unit axis is not supported")]
    lead, first = len(picks) - 1, batch + picks[-1]  # output axes from the indices; first data axis kept
    data_axis = placement.axis if tensor == node.input[0] else placement.axis - lead + first
    if data_axis < first or data_axis >= rank:
        return [Pin(f"GatherND '{label}' indexes the units' axis")]
    return _gathered_through(index, node, placement.moved(data_axis), placement.moved(data_axis - first + lead))


def _along_units(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Constant indices along the units' axis (`onnxprune.gathers`). A permutation (a channel
    shuffle) moves every unit: the rewrite drops the removed positions from the indices. Reached
    from its output, a Gather that repeats or selects (repeat_kv: query head j reads KV head
    j div rep) holds one index per output unit, deleted with it. Reached at its input, repeated
    units are locked (the one KV head of multi-query attention) or derived from the output's
    space (grouped-query KV heads: removed with all the query heads that read them)."""
    label = index.label(node)
    picks = index.const(node.input[1])
    size = placement.size
    if picks is None or picks.ndim != 1 or placement.block != 1 or not index.is_constant(node.input[1]):
        return [Pin(f"Gather '{label}' selects along the units' axis")]
    picks = picks.astype(np.int64) % size
    if len(picks) != size or not np.array_equal(np.sort(picks), np.arange(size)):
        if tensor == node.output[0]:
            return [Through(label), *slice_param(index, node, 1, 0, tensor, placement), Carry(tensor, placement)]
        if len(picks) > size and set(picks) == set(range(size)):  # reached at the input, every unit repeated
            if size == 1:  # the one KV head of multi-query attention: kept
                return [Lock(placement, f"Gather '{label}' shares them with every query head (multi-query attention)")]
            # grouped-query KV heads: each goes with the query heads that read it
            return [Through(label), IndexUpdate(label, tensor, repeats=True), DerivedFrom(label, node.output[0], tuple(int(p) for p in picks))]
        return [Pin(f"Gather '{label}' selects along the units' axis (not a permutation)")]
    if tensor == node.input[0]:
        source = placement
    else:  # reached from the output: output position j holds input position picks[j]
        source = placement.permuted(picks)
    inverse = np.empty(size, dtype=np.int64)
    inverse[picks] = np.arange(size)
    return [IndexUpdate(label, node.input[0]), *through(label, node.input[0], node.output[0], source, source.permuted(inverse))]
