"""Element-wise ops: activations pass units through, broadcasting ops slice their per-unit
constants and couple the unit tensors they join (residual Add, SiLU's x * sigmoid(x))."""

from __future__ import annotations

import onnx

from ..graph import GraphIndex
from ..ops import BROADCAST_ELEMENTWISE, UNARY_PASS_THROUGH
from ..placement import Placement
from ..spaces import ParamSlice
from .registry import Carry, Effect, Pin, carries, through

# Element-wise activations with a per-unit bias input (and onnxruntime contrib ops, by `op_key`): broadcasting.
BIASED_ACTIVATIONS = frozenset({"PRelu", "com.microsoft.FastGelu", "com.microsoft.BiasGelu", "com.microsoft.QuickGelu"})


@carries(*sorted(UNARY_PASS_THROUGH - BIASED_ACTIVATIONS), "com.microsoft.Gelu")
def unary(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Unit i of the output depends only on unit i of the input."""
    return through(index.label(node), node.input[0], node.output[0], placement)


@carries(*sorted(BROADCAST_ELEMENTWISE | BIASED_ACTIVATIONS))
def broadcast(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Inputs align from the right (numpy broadcasting): slice constants, couple unit tensors."""
    label = index.label(node)
    rank, out_rank = index.rank(tensor), index.rank(node.output[0])
    if rank is None or out_rank is None:
        return [Pin(f"{node.op_type} '{label}' has inputs of unknown rank")]
    from_right = placement.axis - rank
    first_data = 1 if node.op_type == "Where" else 0  # Where's condition must not carry units
    effects: list[Effect] = []
    for slot, inp in enumerate(node.input):
        if not inp or inp == tensor:
            continue
        value = index.const(inp)
        dims = value.shape if value is not None else index.shape(inp)
        if dims is None:
            return [*effects, Pin(f"{node.op_type} '{label}' input '{inp}' has an unknown shape")]
        pos = len(dims) + from_right
        if pos < 0 or dims[pos] == 1:
            continue  # the same value for every unit: unit-independent
        if dims[pos] != placement.size or (value is None and slot < first_data):
            return [*effects, Pin(f"{node.op_type} '{label}' input '{inp}' does not broadcast over {placement.size} elements")]
        if value is not None:  # keyed by the output: the same record whichever input led here
            effects.append(ParamSlice(label, slot, pos, node.output[0]))
        else:
            effects.append(Carry(inp, placement.moved(pos)))
    return effects + through(label, tensor, node.output[0], placement, placement.moved(out_rank + from_right))
