"""Element-wise ops: activations pass units through, broadcasting ops slice their per-unit
constants and couple the unit tensors they join (residual Add, SiLU's x * sigmoid(x)); an input
the same along the units' axis (T5's zeros bias) is narrowed to broadcast instead."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex
from ..ops import BROADCAST_ELEMENTWISE, UNARY_PASS_THROUGH, op_key
from ..placement import Placement
from ..spaces import BroadcastUpdate, ParamSlice
from .registry import Carry, Effect, Pin, carries, through

# Element-wise activations with a per-unit bias input (and onnxruntime contrib ops, by `op_key`): broadcasting.
BIASED_ACTIVATIONS = frozenset({"PRelu", "com.microsoft.FastGelu", "com.microsoft.BiasGelu", "com.microsoft.QuickGelu"})
UNIFORM_DEPTH = 8  # ops between an element-wise input and the ConstantOfShape / Expand that makes it uniform
UNIFORM_OPS = (BROADCAST_ELEMENTWISE | UNARY_PASS_THROUGH) - {"Dropout"}  # of uniform inputs; a training-mode Dropout is random


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
    narrowed = _narrowed(index, node, tensor, from_right, placement.size)
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
        if dims[pos] != placement.size:
            return [*effects, Pin(f"{node.op_type} '{label}' input '{inp}' does not broadcast over {placement.size} elements")]
        if slot in narrowed:  # no unit information: narrowed for this reader, not coupled
            effects.append(BroadcastUpdate(label, slot, pos, node.output[0]))
            continue
        if value is None and slot < first_data:
            return [*effects, Pin(f"{node.op_type} '{label}' input '{inp}' does not broadcast over {placement.size} elements")]
        if value is not None:  # keyed by the output: the same record whichever input led here
            effects.append(ParamSlice(label, slot, pos, node.output[0]))
        else:
            effects.append(Carry(inp, placement.moved(pos)))
    return effects + through(label, tensor, node.output[0], placement, placement.moved(out_rank + from_right))


def _narrowed(index: GraphIndex, node: onnx.NodeProto, tensor: str, from_right: int, size: int) -> set[int]:
    """The computed inputs of `size` elements on the units' axis that are the same along it: all,
    unless the units came back from the output and these inputs alone give it that size."""
    uniform: dict[int, bool] = {}
    for slot, inp in enumerate(node.input):
        dims = index.shape(inp) if inp and inp != tensor else None
        if size > 1 and dims is not None and len(dims) + from_right >= 0 and dims[len(dims) + from_right] == size:
            uniform[slot] = index.const(inp) is None and uniform_along(index, inp, len(dims) + from_right)
    if tensor not in node.input and all(uniform.values()):
        return set()
    return {slot for slot, same in uniform.items() if same}


def uniform_along(index: GraphIndex, name: str, axis: int, depth: int = 0) -> bool:
    """Whether tensor `name` holds the same values at every index of `axis` by construction: one
    index there, a ConstantOfShape, an Expand of a tensor without that axis, element-wise ops of such."""
    shape, value = index.shape(name), index.const(name)
    if shape is None or not 0 <= axis < len(shape) or depth > UNIFORM_DEPTH:
        return False
    if shape[axis] == 1:
        return True
    if value is not None:
        return bool(np.all(value == value.take([0], axis=axis)))
    node = index.producer.get(name)
    if node is None:  # a graph input
        return False
    if node.op_type == "ConstantOfShape":
        return True
    if node.op_type == "Expand":
        return _aligned_uniform(index, node.input[0], axis - len(shape), depth)
    if op_key(node) in UNIFORM_OPS:
        return all(_aligned_uniform(index, i, axis - len(shape), depth) for i in node.input if i)
    return False


def _aligned_uniform(index: GraphIndex, name: str, from_right: int, depth: int) -> bool:
    """An input, aligned from the right, is uniform along the output's axis (or lacks it)."""
    rank = index.rank(name)
    return rank is not None and (rank + from_right < 0 or uniform_along(index, name, rank + from_right, depth + 1))
