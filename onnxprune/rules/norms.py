"""Normalisations and reductions: BatchNorm/InstanceNorm slice their per-channel parameters,
a reduction keeps the units unless it reduces over them, and norms over a hidden size
(LayerNorm, RMSNorm) or a window of channels (LRN) pin: node pruning cannot remove units they
normalise together."""

from __future__ import annotations

import onnx

from ..graph import GraphIndex, get_attr
from ..ops import CHANNEL_PARAM_OPS, REDUCE_OPS
from ..placement import Placement
from ..spaces import AttrUpdate
from .conv_pool import not_whole_groups, per_channel
from .registry import Effect, Pin, carries, slice_param, through
from .shapes import axis_mover

HIDDEN_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "com.microsoft.SkipLayerNormalization",
                          "com.microsoft.SkipSimplifiedLayerNormalization", "RMSNormalization"})  # (`op_key` names)


@carries(*sorted(CHANNEL_PARAM_OPS))
def channel_norm(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """BatchNormalization / InstanceNormalization: per-channel parameters on axis 1."""
    return per_channel(index, node, placement, CHANNEL_PARAM_OPS[node.op_type])


@carries(*sorted(REDUCE_OPS))
@axis_mover
def reduce(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A reduction over other axes (global pooling as ReduceMean) keeps the units."""
    label = index.label(node)
    rank = index.rank(node.input[0])
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.const(node.input[1])
        if value is None:
            return [Pin(f"{node.op_type} '{label}' has computed axes")]
        axes = value.tolist()
    if rank is None or not axes:
        return [Pin(f"{node.op_type} '{label}' reduces over every axis")]
    axes = [a % rank for a in axes]
    axis = placement.axis
    if axis in axes:
        return [Pin(f"{node.op_type} '{label}' reduces over the units' axis (an RMSNorm/LayerNorm over a hidden size is not prunable by node pruning)")]
    out_axis = axis if get_attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)
    return through(label, node.input[0], node.output[0], placement, placement.moved(out_axis))


@carries(*sorted(HIDDEN_NORMS))
def hidden_norm(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A norm over the units couples every unit with the others."""
    return [Pin(f"{node.op_type} '{index.label(node)}' normalises over these units (a transformer's hidden size): not prunable by node pruning")]


@carries("GroupNormalization")
def group_norm(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """GroupNormalization normalises each group of channels on its own: a unit is a whole group
    (finer units are regrown), `num_groups` counts the kept groups and scale/bias lose the
    removed groups' entries (one per group in opset 18, one per channel since opset 21)."""
    label, groups = index.label(node), get_attr(node, "num_groups")
    shape = index.shape(node.input[0])
    where = f"GroupNormalization '{label}' (num_groups={groups})"
    if placement.axis != 1 or not groups or shape is None or shape[1] is None or shape[1] % groups:
        return [Pin(f"{where} normalises the units' axis in groups onnxprune cannot read")]
    regroup = not_whole_groups(placement, shape[1] // groups, where)
    if regroup:
        return regroup
    effects: list[Effect] = [AttrUpdate(label, "num_groups", node.input[0])]
    for slot in (1, 2):
        value = index.const(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
        if value is None or value.ndim != 1 or len(value) not in (groups, shape[1]):
            return [Pin(f"{where} has a scale or bias that is not a constant per group or channel")]
        effects += slice_param(index, node, slot, 0, node.input[0], placement, per_element=len(value) == shape[1])
    return effects + through(label, node.input[0], node.output[0], placement)


@carries("LRN")
def local_response_norm(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """LRN divides each channel by a sum over its neighbours' squares: channels are coupled (a
    removed one changes its neighbours), positions are not."""
    label = index.label(node)
    if placement.axis == 1:
        return [Pin(f"LRN '{label}' normalises each channel by its {get_attr(node, 'size', 1)} neighbours' squares: "
                    "removing a channel changes the others, not prunable by node pruning")]
    return through(label, node.input[0], node.output[0], placement, placement)
