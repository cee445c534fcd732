"""Normalisations and reductions: BatchNorm/InstanceNorm slice their per-channel parameters,
a reduction keeps the units unless it reduces over them, and norms over a hidden size
(LayerNorm, RMSNorm) pin: node pruning cannot remove units they normalise together."""

from __future__ import annotations

import onnx

from ..graph import GraphIndex, get_attr
from ..ops import CHANNEL_PARAM_OPS, REDUCE_OPS
from ..placement import Placement
from .conv_pool import per_channel
from .registry import Effect, Pin, carries, through
from .shapes import axis_mover

HIDDEN_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization"})


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
