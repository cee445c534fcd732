"""Graph analysis: find the prunable spaces (DESIGN §3).

A *space* is a set of n units that must be removed together: the output channels of its
producers, carried through pass-through ops (whose per-unit constants are sliced) to the
consumers whose input weights absorb the least-squares recovery. Each space is grown from one
producer by the worklist engine (`grow.py`) with the op rules of `rules/`; this module runs it
for every producer, regrows a space with coarser units (heads) or merged units (fused QKV) when
the engine asks, and pins spaces that share a shape constant.
"""

from __future__ import annotations

import dataclasses

import onnx

from .graph import GraphIndex, get_attr, get_text_attr
from .grow import Alias, Grower, Regrow, append_new, producer_output, root_placement
from .ops import op_key
from .rules.conv_pool import is_depthwise
from .rules.matmul import linear_weight_axes
from .rules.recurrent import state_site
from .spaces import (
    CACHE_NAME,
    Analysis,
    AttrUpdate,
    CacheIO,
    Consumer,
    IndexUpdate,
    ParamSlice,
    ShapeUpdate,
    Site,
    Space,
    WindowUpdate,
)
from .tidy import MOVES

__all__ = [
    "CACHE_NAME", "Analysis", "AttrUpdate", "CacheIO", "Consumer", "IndexUpdate", "ParamSlice", "ShapeUpdate", "Site", "Space",
    "WindowUpdate", "analyse", "linear_weight_axes", "producer_output",
]


def analyse(model: onnx.ModelProto, exclude: list[str] | None = None, index: GraphIndex | None = None) -> Analysis:
    """Find every space of units in the model; pinned spaces carry the reasons."""
    index = index or GraphIndex(model)
    claimed: dict[str, list[tuple[int, set[int]]]] = {}
    spaces: list[Space] = []
    for node in index.nodes:
        produced = producer_output(index, node)
        if produced is None or produced[0] in claimed:
            continue
        out, axis, features = produced
        slots = features
        labels = list(range(slots))  # unit of each producer slot (aliases repeat a unit)
        for _ in range(12):  # regrow: coarser units for heads, aliased units for fused QKV
            n = max(labels) + 1
            space = Space(id=len(spaces), name=index.label(node), n=n)
            trial = {k: list(v) for k, v in claimed.items()}
            root = root_placement(axis, labels, features // slots)
            grower = Grower(index, space, trial, list(exclude or []), (index.label(node), root))
            try:
                grower.add(out, root)
                grower.run()
            except Regrow as coarser:
                if n == slots:
                    slots = coarser.n
                    labels = list(range(slots))
                    continue
                grouped = _grouped_labels(labels, n // coarser.n)  # aliased parts, then heads (nn.MultiheadAttention)
                if grouped is None:
                    space.pinned.append("units are grouped by a Reshape after being aliased")
                    break
                slots, labels = len(grouped), grouped
                continue
            except Alias as alias:
                labels = _merge_labels(labels, alias.pairs)
                continue
            claimed.clear()
            claimed.update(trial)
            break
        _attach_state_site(index, space)
        _attach_pooled_sources(index, space)
        if len(space.locked) == space.n and not space.pinned:
            space.pinned.extend(space.lock_reasons)  # nothing left to prune
        if space.derived is not None and space.consumers and not space.pinned:
            space.pinned.append(f"Gather '{space.derived.node}' repeats these units and a linear layer reads them too")
        if not space.consumers and not space.pinned and space.derived is None:
            space.pinned.append("no linear layer reads these units")
        if len({(space.tensors[t].block, space.tensors[t].repeats) for t in space.sites}) > 1:
            space.pinned.append("consumers read the units with different layouts")
        spaces.append(space)
    _pin_shared_shape_constants(spaces)
    spaces += _computed_weight_layers(index, len(spaces))
    spaces += _grouped_conv_layers(index, claimed, len(spaces))
    return Analysis(spaces)


LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ops that turn a stored weight into the value a layer reads (their first input is the weight)
WEIGHT_OPS = MOVES | {"Cast", "DequantizeLinear", "Identity"}


def _computed_weight_layers(index: GraphIndex, first_id: int) -> list[Space]:
    """Linear layers whose weight is computed at run time from a stored weight (a Cast of an
    fp16 weight, DequantizeLinear of a quantised one, a Slice with computed bounds): their units
    are not analysed, and the report says so as pinned spaces."""
    found = []
    for node in index.nodes:
        if op_key(node) not in LINEAR or len(node.input) < 2 or producer_output(index, node) is not None:
            continue
        weight, shape = node.input[1], index.shape(node.input[1])
        source = _stored_weight_source(index, weight)
        if source is None or not shape or shape[-1] is None:
            continue
        transposed = node.op_type == "Gemm" and get_attr(node, "transB", 0)
        units = shape[0] if node.op_type == "Conv" or transposed else shape[1] if node.op_type == "ConvTranspose" else shape[-1]
        label = index.label(node)
        found.append(Space(first_id + len(found), label, int(units or 0), producers=[label],
                           pinned=[f"{node.op_type} '{label}' reads a weight computed at run time ({source.op_type} "
                                   f"'{index.label(source)}'): its units are not analysed"]))
    return found


def _grouped_conv_layers(index: GraphIndex, claimed: dict, first_id: int) -> list[Space]:
    """Grouped (not depthwise) Convs and ConvTransposes start no space: one of their units would
    be a whole group with its input channels, which the channels' own space upstream cannot
    follow. Unless another space carries their output, the report lists them as pinned spaces
    with that reason."""
    found = []
    for node in index.nodes:
        group = get_attr(node, "group", 1) if node.op_type in ("Conv", "ConvTranspose") else 1
        if group == 1 or node.output[0] in claimed or len(node.input) < 2 or not index.is_constant(node.input[1]) \
                or is_depthwise(index, node):  # depthwise: a pass-through of its input's units
            continue
        dims = index.const_dims(node.input[1])
        label = index.label(node)
        units = dims[0] if node.op_type == "Conv" else dims[1] * group
        found.append(Space(first_id + len(found), label, int(units), producers=[label],
                           pinned=[f"grouped {node.op_type} '{label}' (group={group}) starts no space: a unit would be a whole group "
                                   "with its input channels"]))
    return found


def _stored_weight_source(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The node next to the weight when `name` is computed from a stored (initializer) weight by
    WEIGHT_OPS alone; None for a constant or anything else (an activation)."""
    node = index.producer.get(name)
    first = node
    for _ in range(8):
        if node is None or op_key(node) not in WEIGHT_OPS or not node.input:
            return None
        if node.input[0] in index.initializer_names:
            return first
        node = index.producer.get(node.input[0])
    return None


def _attach_state_site(index: GraphIndex, space: Space) -> None:
    """A recurrent op's hidden units are read back through R: fit that recovery where the
    states of every direction lie side by side (a statistics site of the space)."""
    for i, read in enumerate(space.recurrent_reads):
        site = state_site(index, space.tensors, index.node(read.node), space.sites)
        if site is None:
            append_new(space.pinned, f"the hidden states of '{read.node}' never lie side by side on one tensor (their recovery cannot be fitted)")
            continue
        space.recurrent_reads[i] = dataclasses.replace(read, site=site)
        append_new(space.sites, site)


SHAPE_ONLY = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"})


def _attach_pooled_sources(index: GraphIndex, space: Space) -> None:
    """A site written by a spatial mean (GlobalAveragePool, ReduceMean, an AveragePool that
    averages valid entries only), possibly reshaped, has one row per sample; its pooled input
    carries the same units at every position. x_P ~ B x_K + b at every position gives the same
    relation for their mean, so the pooled input is the fallback statistics site."""
    for tensor in space.sites:
        node = index.producer.get(tensor)
        while node is not None and node.op_type in SHAPE_ONLY and node.input[0] in space.tensors:
            node = index.producer.get(node.input[0])
        if node is None or not _is_mean(node):
            continue
        source = node.input[0]
        placement = space.tensors.get(source)
        if placement is not None and placement.size == space.tensors[tensor].size and placement.block == space.tensors[tensor].block:
            space.pooled[tensor] = source


def _is_mean(node: onnx.NodeProto) -> bool:
    if node.op_type in ("GlobalAveragePool", "ReduceMean"):
        return True
    if node.op_type == "AveragePool":
        pads = get_attr(node, "pads", [])
        same = get_text_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        return not get_attr(node, "count_include_pad", 0) or not (any(pads) or same)
    return False


def _grouped_labels(labels: list[int], factor: int) -> list[int] | None:
    """Slot labels `factor` times coarser, when every run of `factor` slots holds one whole group
    of units (units l..l+factor-1, l a multiple of factor: a head of every aliased part); None
    otherwise."""
    if len(labels) % factor:
        return None
    runs = [labels[i:i + factor] for i in range(0, len(labels), factor)]
    if any(run[0] % factor or run != list(range(run[0], run[0] + factor)) for run in runs):
        return None
    return [run[0] // factor for run in runs]


def _merge_labels(labels: list[int], pairs: list[tuple[int, int]]) -> list[int]:
    """Union the aliased units and renumber them 0.. in order of first appearance."""
    parent = list(range(max(labels) + 1))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for a, b in pairs:
        parent[find(a)] = find(b)
    roots = [find(u) for u in labels]
    numbering = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return [numbering[r] for r in roots]


def _pin_shared_shape_constants(spaces: list[Space]) -> None:
    """A shape constant edited in place (a Div's divisor, a nested Concat's entry) that must hold
    the sizes of two different tensors cannot be edited for both: pin those spaces. A target
    Concat, or the batch x heads product under it, that exporters share between layers is copied
    for each Reshape (`ShapeUpdate.via`), so its records never meet here. Spaces on the same tensor
    (a Concat of several spaces), and one space's tensors that carry its units alike (q, k and v
    of a head fold's factor), agree on the size and are fine."""
    owners: dict[tuple[str, int, int, str], dict[str, set[int]]] = {}
    layouts: dict[str, tuple] = {}
    for space in spaces:
        for update in space.reshapes:
            owners.setdefault((update.node, update.input_index, update.position, update.via), {}).setdefault(update.tensor, set()).add(space.id)
            placement = space.tensors.get(update.tensor)
            if placement is not None:
                layouts.setdefault(update.tensor, (placement.width, placement.block, placement.segments))
    for (node, _, _, _), tensors in owners.items():
        sizes = {(frozenset(ids), layouts.get(tensor, tensor)) for tensor, ids in tensors.items()}
        if len(sizes) > 1:
            for space in spaces:
                if any(space.id in ids for ids in tensors.values()):
                    append_new(space.pinned, f"shape constant of '{node}' is shared with another space")
