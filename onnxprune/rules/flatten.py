"""A feature map flattened into a linear layer (C x H x W -> Gemm/MatMul): each channel owns
H*W consecutive features, and the spatial positions are samples of the channels (DESIGN §2)."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr
from ..placement import Placement
from ..spaces import Consumer, ShapeUpdate
from .matmul import linear_weight_axes
from .registry import Effect, Flattened, Pin, Through, consumes, read_by
from .shape_targets import shape_update
from .shape_values import static_value


def _is_flatten_into_linear(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> bool:
    shape, out = index.shape(tensor), index.shape(node.output[0])
    return placement.axis == 1 and placement.block == 1 and shape is not None and len(shape) >= 3 and out is not None and len(out) == 2


@consumes("Flatten", "Reshape")
def flatten_into_linear(index: GraphIndex, node: onnx.NodeProto, slot: int, tensor: str, placement: Placement) -> list[Effect] | None:
    """The Gemm/MatMul layers after a Flatten (or 2-D Reshape) of channels read H*W features each.
    A target computed at run time (TorchScript's view(x.size(0), -1)) is read at the analysis's
    static shapes: its batch entry stays computed (a unit-axis size read into it pins, see the
    Shape rule), an entry that carries the unit count is rewritten like a Reshape target's."""
    if slot != 0 or not _is_flatten_into_linear(index, node, tensor, placement):
        return None
    label, op = index.label(node), node.op_type
    shape = index.shape(tensor)
    effects: list[Effect] = []
    if op == "Flatten":
        if get_attr(node, "axis", 1) != 1:
            return [Pin(f"Flatten '{label}' does not flatten from the channel axis")]
        reshape_target = None
    else:
        target = index.const(node.input[1]) if len(node.input) > 1 else None
        computed = target is None and len(node.input) > 1  # TorchScript's view(x.size(0), -1)
        if computed:
            target = static_value(index, node.input[1])
        if target is None or target.ndim != 1 or len(target) != 2:
            return [Pin(f"Reshape '{label}' has a computed or non-2-D target shape")]
        batch = shape[0]
        if int(target[0]) not in (0, -1) and (batch is None or int(target[0]) != batch):
            return [Pin(f"Reshape '{label}' mixes the batch and unit axes")]
        reshape_target = int(target[1])
    flat = node.output[0]
    uses = index.uses.get(flat, [])
    if flat in index.graph_outputs:
        return [Pin(f"tensor '{flat}' is a graph output (through {op} '{label}')")]
    if not uses:
        return [Pin(f"{op} '{label}' output is not read by a linear layer")]
    consumers = []
    for use in uses:
        axes = linear_weight_axes(index, use.node, use.index)
        if axes is None:
            return [Pin(f"{op} '{label}' feeds {use.node.op_type} '{index.label(use.node)}', not a Gemm/MatMul")]
        features = index.const_dims(use.node.input[1])[axes[0]]
        if features % placement.width:
            return [Pin(f"{use.node.op_type} '{index.label(use.node)}' has {features} inputs, not a multiple of {placement.width}")]
        consumers.append((use.node, axes, features // placement.width))  # features per channel
    blocks = {b for _, _, b in consumers}
    spatial = list(shape[2:])
    if len(blocks) != 1 or (None not in spatial and int(np.prod(spatial, dtype=np.int64)) not in blocks):
        return [Pin(f"{op} '{label}' feature count does not match channels x spatial size")]
    block = blocks.pop()
    if reshape_target is not None and reshape_target != -1:
        if reshape_target != placement.width * block:
            return [Pin(f"Reshape '{label}' target {reshape_target} is not {placement.width} x {block}")]
        effects += shape_update(index, node, 1, block, tensor) if computed else [ShapeUpdate(label, 1, 1, block, tensor)]
    effects += [Through(label), Flattened(flat)]
    for consumer_node, (in_axis, out_axis), _ in consumers:
        effects += read_by(index, Consumer(index.label(consumer_node), consumer_node.op_type, 1, in_axis, out_axis, tensor, block))
    return effects
