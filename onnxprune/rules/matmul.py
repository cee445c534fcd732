"""Gemm/MatMul and attention: a constant 2-D weight creates units on the last axis and reads
them on its reduction axis; MatMul of two activations (q @ kᵀ, probs @ v) carries units on a
batch axis (heads); Softmax must not normalise over them; fused attention pins (recurrent ops: recurrent.py)."""

from __future__ import annotations

import onnx

from ..graph import GraphIndex, get_attr, get_text_attr
from ..placement import Placement
from ..spaces import Consumer, ParamSlice
from .registry import Carry, Effect, Pin, Produced, Through, carries, consumes, produces, read_by, through

# ONNX's own Attention (opset 23) and onnxruntime's contrib ops (`op_key` names)
FUSED_ATTENTION = frozenset({"Attention", *(f"com.microsoft.{op}" for op in ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                                                                            "DecoderMaskedMultiHeadAttention", "EmbedLayerNormalization"))})


def _gemm_output(index: GraphIndex, node: onnx.NodeProto) -> Produced | None:
    if index.is_constant(node.input[1]) and not get_attr(node, "transA", 0):
        dims = index.const_dims(node.input[1])
        if len(dims) == 2 and (len(node.input) < 3 or not node.input[2] or index.is_constant(node.input[2])):
            return Produced(node.output[0], 1, int(dims[0] if get_attr(node, "transB", 0) else dims[1]))
    return None


def _gemm_slices(index: GraphIndex, node: onnx.NodeProto, n: int) -> list[ParamSlice]:
    """The weight's output rows (columns without transB) and a bias that has one entry per output
    (compared with the output width, not the unit count: a head holds several outputs)."""
    label, out = index.label(node), node.output[0]
    out_axis = 0 if get_attr(node, "transB", 0) else 1
    slices = [ParamSlice(label, 1, out_axis, out)]
    bias = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == index.const_dims(node.input[1])[out_axis] > 1:
        slices.append(ParamSlice(label, 2, bias.ndim - 1, out))
    return slices


def _matmul_output(index: GraphIndex, node: onnx.NodeProto) -> Produced | None:
    if index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
        dims = index.const_dims(node.input[1])
        rank = index.rank(node.output[0])
        if len(dims) == 2 and rank is not None:
            return Produced(node.output[0], rank - 1, int(dims[1]))
    return None


produces(("Gemm",), _gemm_output, _gemm_slices)
produces(("MatMul",), _matmul_output, lambda index, node, n: [ParamSlice(index.label(node), 1, 1, node.output[0])])


def linear_weight_axes(index: GraphIndex, node: onnx.NodeProto, slot: int) -> tuple[int, int] | None:
    """(in_axis, out_axis) of the constant 2-D weight when `node` is a Gemm/MatMul reading `slot` 0."""
    if slot != 0 or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return None
    if len(index.const_dims(node.input[1])) != 2:
        return None
    if node.op_type == "Gemm" and not get_attr(node, "transA", 0):
        return (1, 0) if get_attr(node, "transB", 0) else (0, 1)
    if node.op_type == "MatMul":
        return 0, 1
    return None


@consumes("Gemm", "MatMul")
def linear_reads(index: GraphIndex, node: onnx.NodeProto, slot: int, tensor: str, placement: Placement) -> list[Effect] | None:
    """A constant-weight Gemm/MatMul reads the units on its reduction (last) axis."""
    axes = linear_weight_axes(index, node, slot)
    if axes is None:
        return None
    op, label, rank = node.op_type, index.label(node), index.rank(tensor)
    if rank is None or placement.axis != rank - 1:
        return [Pin(f"{op} '{label}' does not reduce over the units' axis")]
    if index.const_dims(node.input[1])[axes[0]] != placement.size:
        return [Pin(f"{op} '{label}' weight does not match {placement.size} inputs")]
    return read_by(index, Consumer(label, op, 1, axes[0], axes[1], tensor))


@carries("MatMul")
def batched_matmul(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """MatMul of two activations (attention scores, probs @ V): units on a batch axis (heads), or
    on the right operand's columns / the left operand's rows (`_matrix_axis`)."""
    label = index.label(node)
    ranks = [index.rank(i) for i in node.input]
    out_rank = index.rank(node.output[0])
    if None in ranks or out_rank is None or any(index.is_constant(i) for i in node.input):
        return [Pin(f"MatMul '{label}' mixes the units (constant operand on the units' side or unknown rank)")]
    from_right = placement.axis - index.rank(tensor)
    if from_right >= -2:
        return _matrix_axis(index, node, tensor, placement, from_right)
    effects: list[Effect] = []
    for inp, r in zip(node.input, ranks, strict=True):
        if inp != tensor:
            shape = index.shape(inp)
            pos = r + from_right
            if pos >= 0 and shape is not None and shape[pos] not in (1,):
                effects.append(Carry(inp, placement.moved(pos)))
    return effects + through(label, tensor, node.output[0], placement, placement.moved(out_rank + from_right))


def _matrix_axis(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement, from_right: int) -> list[Effect]:
    """Units on a matrix axis of an activation MatMul: the right operand's columns are the
    output's columns (probs @ V of single-head attention, SAR's glimpse), the left operand's rows
    the output's rows; every other case contracts or mixes them."""
    label, (left, right), out = index.label(node), node.input, node.output[0]
    pin = [Pin(f"MatMul '{label}' contracts or mixes the units' axis")]
    if left == right:
        return pin
    side = {(right, -1): right, (left, -2): left, (out, -1): right, (out, -2): left}.get((tensor, from_right))
    shape = index.shape(side) if side is not None else None
    if side is None or shape is None or len(shape) < 2 or shape[from_right] == 1:
        return pin
    return [Through(label), Carry(side, placement.moved(len(shape) + from_right)), Carry(out, placement.moved(index.rank(out) + from_right))]


@carries("Einsum")
def einsum(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Einsum of activations with an explicit equation ('bhid,bhjd->bhij'): the units' letter
    must be a batch index, kept in the output; every operand with that letter carries them."""
    label = index.label(node)
    terms = _einsum_terms(get_text_attr(node, "equation"))
    if terms is None:
        return [Pin(f"Einsum '{label}' has an implicit or broadcast (...) equation")]
    *inputs, output = terms
    names = [*node.input, node.output[0]]
    own = inputs[list(node.input).index(tensor)] if tensor in node.input else output
    if placement.axis >= len(own) or own.count(own[placement.axis]) > 1:
        return [Pin(f"Einsum '{label}' reads the units' axis as a diagonal")]
    letter = own[placement.axis]
    if letter not in output:
        return [Pin(f"Einsum '{label}' contracts the units' axis")]
    effects: list[Effect] = [Through(label)]
    for name, term in zip(names, [*inputs, output], strict=True):
        if letter in term:
            if index.is_constant(name):
                return [Pin(f"Einsum '{label}' reads the units with a constant operand")]
            effects.append(Carry(name, placement.moved(term.index(letter))))
    return effects


def _einsum_terms(equation: str) -> list[str] | None:
    """The letters of each operand and of the output, or None for an implicit output or '...'."""
    text = equation.replace(" ", "")
    if "->" not in text or "." in text:
        return None
    lhs, rhs = text.split("->")
    return [*lhs.split(","), rhs]


@carries("Softmax", "LogSoftmax")
def softmax(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Softmax over another axis (attention's keys) keeps each head apart; reached from its
    output (v's heads first), the input carries them too."""
    rank = index.rank(tensor)
    if rank is None or get_attr(node, "axis", -1) % rank == placement.axis:
        return [Pin(f"{node.op_type} '{index.label(node)}' normalises over the units' axis")]
    return through(index.label(node), node.input[0], node.output[0], placement)


@carries(*sorted(FUSED_ATTENTION))
def fused_attention(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """onnxruntime's fused attention ops hide the heads."""
    return [Pin(f"onnxruntime fused op {node.op_type} '{index.label(node)}' hides the heads; export the model without fusion (e.g. before onnxruntime's transformer optimizer)")]
