"""Recurrent ops (LSTM / GRU / RNN). The input sequence X is read through W [directions,
gates x hidden, input] like a linear layer per step (its recovery folds into W and the Wb half
of B). The hidden units are a space of their own: a unit is the gate rows of W, R and B of one
hidden index in every direction, R's column of that index (the op reads its own units back as
h_{t-1}) and its place on Y [T, directions, N, hidden]; the recovery folds per direction into
R and Rb (`RecurrentRead`, fitted where the states of all directions lie side by side)."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, get_attr, get_text_attr
from ..ops import RECURRENT_GATES
from ..placement import Placement
from ..spaces import AttrUpdate, Consumer, ParamSlice, RecurrentRead
from .registry import Carry, Effect, Pin, Produced, carries, consumes, produces, read_by, through

INITIAL_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
PEEPHOLE_SLOT = 7  # LSTM's P [directions, 3 x hidden]
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
ZERO_PRESERVING = LAYOUT_OPS | {"Slice", "Expand", "Cast", "Tile"}  # zeros in, zeros out (data input 0)


def _hidden_output(index: GraphIndex, node: onnx.NodeProto) -> Produced | None:
    """Y [T, directions, N, hidden] (axis 3 with either layout) holds the hidden units, also
    when only the last state Y_h is read (a classifier on h_n): Y is then where R's recovery is
    fitted."""
    last_read = len(node.output) > 1 and index.is_read(node.output[1])
    if not node.output or not node.output[0] or not (index.is_read(node.output[0]) or last_read) or index.rank(node.output[0]) != 4:
        return None
    hidden = get_attr(node, "hidden_size")
    if hidden is None and len(node.input) > 2 and index.is_constant(node.input[2]):
        hidden = index.const_dims(node.input[2])[-1]
    return None if hidden is None else Produced(node.output[0], 3, int(hidden))


def is_zero_state(index: GraphIndex, name: str, depth: int = 16) -> bool:
    """Zeros whatever the batch: a constant of zeros, or a ConstantOfShape of zeros reached
    through shape-only ops and Concats of zeros (TorchScript's h0/c0; a multi-layer RNN's Slice
    of one zero tensor; tf2onnx's Concat of an Expand of 0 per direction)."""
    value = index.const(name)
    if value is not None:
        return not np.any(value)
    writer = index.producer.get(name)
    if writer is None or depth == 0:
        return False
    if writer.op_type == "ConstantOfShape":
        fill = get_attr(writer, "value")
        return fill is None or not np.any(onnx.numpy_helper.to_array(fill))
    if writer.op_type == "Concat":
        return all(is_zero_state(index, i, depth - 1) for i in writer.input)
    return writer.op_type in ZERO_PRESERVING and is_zero_state(index, writer.input[0], depth - 1)


def _hidden_slices(index: GraphIndex, node: onnx.NodeProto, n: int) -> list[Effect]:
    """Gate rows of W, R, B (and P), R's columns, constant initial states, hidden_size; the
    states the rewrite must drop; pins for what the fold cannot follow."""
    op, label, y = node.op_type, index.label(node), node.output[0]
    gates = RECURRENT_GATES[op]
    effects: list[Effect] = []
    for slot, name in ((1, "W"), (2, "R"), (3, "B"), (PEEPHOLE_SLOT, "P")):
        if slot < len(node.input) and node.input[slot] and not index.is_constant(node.input[slot]):
            effects.append(Pin(f"recurrent {op} '{label}' {name} is not a constant"))
    if op == "GRU" and not get_attr(node, "linear_before_reset", 0):
        effects.append(Pin(f"GRU '{label}' has linear_before_reset=0: the reset gate scales h_(t-1) before R, so its hidden units are not pruned"))
    if len(node.output) > 1 and index.is_read(node.output[1]):  # Y_h [directions, N, hidden]: the last hidden states
        hidden = _hidden_output(index, node).features
        effects.append(Carry(node.output[1], Placement.identity(2, n, hidden // n)))
    if len(node.output) > 2 and index.is_read(node.output[2]):
        effects.append(Pin(f"recurrent {op} '{label}' output '{node.output[2]}' (the last cell state) is used"))
    zero = []
    for slot in INITIAL_STATES[op]:
        state = node.input[slot] if slot < len(node.input) else ""
        if not state:
            continue
        if is_zero_state(index, state):
            zero.append(slot)  # dropped: an absent state is zero
        elif index.is_constant(state):
            effects.append(ParamSlice(label, slot, 2, y))
        else:
            effects.append(Pin(f"recurrent {op} '{label}' initial state '{state}' is computed"))
    effects += [ParamSlice(label, 1, 1, y, gates), ParamSlice(label, 2, 1, y, gates), ParamSlice(label, 2, 2, y),
                ParamSlice(label, 3, 1, y, 2 * gates), AttrUpdate(label, "hidden_size", y), RecurrentRead(label, "", tuple(zero))]
    if op == "LSTM" and len(node.input) > PEEPHOLE_SLOT and node.input[PEEPHOLE_SLOT]:
        effects.append(ParamSlice(label, PEEPHOLE_SLOT, 1, y, 3))
    return effects


produces(tuple(RECURRENT_GATES), _hidden_output, _hidden_slices)


def state_site(index: GraphIndex, tensors: dict[str, Placement], node: onnx.NodeProto, sites: list[str]) -> str | None:
    """A tensor that holds every direction's hidden states side by side on its unit axis, in
    direction order, reached from Y through layout ops, Slices of one direction and a Concat of
    them in order (tf2onnx); for one direction, Y itself: where R's recovery is fitted. A
    consumer's site is preferred (its statistics are gathered anyway)."""
    y, directions = node.output[0], 2 if get_text_attr(node, "direction", "forward") == "bidirectional" else 1
    found, queue, seen = [], [y], set()
    while queue:
        name = queue.pop(0)
        placement = tensors.get(name)
        if placement is None or name in seen:
            continue
        seen.add(name)
        if placement.repeats * placement.block == directions:
            found.append(name)
        for use in index.uses.get(name, []):
            op = use.node.op_type
            if (op in LAYOUT_OPS or op == "Slice") and use.index == 0:
                queue.append(use.node.output[0])
            elif op == "Concat" and [_direction_of(index, i, y) for i in use.node.input] == list(range(directions)):
                queue.append(use.node.output[0])
    return next((t for t in found if t in sites), found[0] if found else None)


def _direction_of(index: GraphIndex, name: str, y: str) -> int | None:
    """d when the tensor is direction d of Y ([T, directions, N, H]) cut by a Slice on axis 1,
    through layout ops; else None."""
    for _ in range(8):
        writer = index.producer.get(name)
        if writer is None:
            return None
        if writer.op_type == "Slice" and writer.input[0] == y:
            starts = index.const(writer.input[1]) if len(writer.input) > 1 else None
            ends = index.const(writer.input[2]) if len(writer.input) > 2 else None
            axes = index.const(writer.input[3]) if len(writer.input) > 3 and writer.input[3] else np.array([0])
            if starts is None or ends is None or starts.size != 1 or int(axes.reshape(-1)[0]) % 4 != 1:
                return None
            return int(starts.reshape(-1)[0]) if int(ends.reshape(-1)[0]) == int(starts.reshape(-1)[0]) + 1 else None
        if writer.op_type not in LAYOUT_OPS:
            return None
        name = writer.input[0]
    return None


@carries("ReverseSequence")
def reverse_sequence(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Reverses each sequence along the time axis (a backward RNN built from a Loop): units on
    another axis than time and batch pass through."""
    if tensor not in (node.input[0], node.output[0]) or placement.axis in (get_attr(node, "batch_axis", 1), get_attr(node, "time_axis", 0)):
        return [Pin(f"ReverseSequence '{index.label(node)}' reverses along the units' axis")]
    return through(index.label(node), node.input[0], node.output[0], placement)


@consumes(*RECURRENT_GATES)
def recurrent_input(index: GraphIndex, node: onnx.NodeProto, slot: int, tensor: str, placement: Placement) -> list[Effect] | None:
    """An LSTM/GRU/RNN reads its input sequence X ([T, N, in], or [N, T, in] with layout 1)
    through W [directions, gates x hidden, in]: a linear layer per step on the last axis, whose
    bias is the Wb half of B; the recovery folds into W and Wb like a Gemm's."""
    if slot != 0:
        return None
    op, label = node.op_type, index.label(node)
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return [Pin(f"recurrent {op} '{label}' input weight W is not a constant")]
    if len(node.input) > 3 and node.input[3] and not index.is_constant(node.input[3]):
        return [Pin(f"recurrent {op} '{label}' bias B is not a constant")]
    dims = index.const_dims(node.input[1])
    if index.rank(tensor) != 3 or placement.axis != 2 or len(dims) != 3:
        return [Pin(f"recurrent {op} '{label}' does not read the units on its input axis")]
    if dims[2] != placement.size:
        return [Pin(f"recurrent {op} '{label}' weight W does not match {placement.size} inputs")]
    return read_by(index, Consumer(label, op, 1, 2, 1, tensor))


@carries(*RECURRENT_GATES)
def recurrent(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Units reaching a recurrent op other than as its input sequence (an initial state computed
    from them) pin."""
    return [Pin(f"units reach recurrent {node.op_type} '{index.label(node)}' other than as its input sequence")]
