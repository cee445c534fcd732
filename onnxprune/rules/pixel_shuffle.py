"""DepthToSpace (PixelShuffle) and SpaceToDepth: channels moved to and from blocks of r x r
pixels. An output channel of DepthToSpace is r x r channels of its input, r x r consecutive
ones (CRD, torch's PixelShuffle) or one in each of r x r runs of C_out channels (DCR); SpaceToDepth
puts input channel c at output channels k x C + c (k < r x r), the DCR order. Followed both ways."""

from __future__ import annotations

import onnx

from ..graph import GraphIndex, get_attr, get_text_attr
from ..placement import Placement
from .conv_pool import not_whole_groups
from .registry import Carry, Effect, Pin, Through, carries, through


def _where(index: GraphIndex, node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{index.label(node)}'"


def _copies(index: GraphIndex, node: onnx.NodeProto, placement: Placement) -> int | Pin:
    """r x r, or a Pin unless the units are on the channel axis of a 4-d tensor."""
    if placement.axis != 1 or index.rank(node.input[0]) not in (None, 4):
        return Pin(f"{_where(index, node)} moves channels into pixels, the units are on axis {placement.axis}")
    return int(get_attr(node, "blocksize", 1)) ** 2


def gathered(label: str, placement: Placement, copies: int) -> list[Placement] | Pin:
    """The r x r runs of a DCR-ordered channel axis as placements of one run each; they must
    carry units of this space at the same positions (different units there are aliased: one
    unit), else an output channel would mix these units with other channels."""
    if placement.width % copies:
        return Pin(f"{label} splits the units' blocks across its {copies} runs of channels")
    part = placement.width // copies
    runs = [run for k in range(copies) if (run := placement.window(k * part, (k + 1) * part)) is not None]
    if len(runs) < copies or len({tuple(sorted(run.unit_positions()[1].tolist())) for run in runs}) > 1:
        return Pin(f"{label} mixes these units with other channels in one output channel")
    return runs


def _gathered_effects(index: GraphIndex, node: onnx.NodeProto, wide: str, narrow: str, placement: Placement, copies: int) -> list[Effect]:
    """`wide` carries the units r x r times (DCR order): `narrow` carries each run of it."""
    runs = gathered(_where(index, node), placement, copies)
    if isinstance(runs, Pin):
        return [runs]
    return [Through(index.label(node)), Carry(wide, placement), *(Carry(narrow, run) for run in runs)]


def _merged_blocks(label: str, placement: Placement, copies: int) -> tuple[Placement | None, list[Effect]]:
    """CRD: r x r consecutive input channels make one output channel, so a unit must hold whole
    runs of them (finer units are regrown in runs of r x r)."""
    if placement.block % copies == 0:
        return placement.moved(1, block=placement.block // copies, width=placement.width), []
    return None, not_whole_groups(placement, copies, label)  # block != copies: a Coarsen or a Pin


@carries("DepthToSpace")
def depth_to_space(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A unit on the output is r x r channels of the input: a block of them (CRD) or one in
    each run of C_out channels (DCR); reached from the output, the input is mapped back first."""
    copies = _copies(index, node, placement)
    if isinstance(copies, Pin):
        return [copies]
    crd = get_text_attr(node, "mode", "DCR") == "CRD"
    inp, out = node.input[0], node.output[0]
    if tensor != inp:
        placement = placement.moved(1, block=placement.block * copies, width=placement.width) if crd else placement.repeated(copies)
    if not crd:
        return _gathered_effects(index, node, inp, out, placement, copies)
    moved, effects = _merged_blocks(_where(index, node), placement, copies)
    return effects if moved is None else through(index.label(node), inp, out, placement, moved)


@carries("SpaceToDepth")
def space_to_depth(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Input channel c goes to output channels k x C + c (k < r x r): every unit r x r times on
    the output; reached from the output, each run of C channels is a placement of the input."""
    copies = _copies(index, node, placement)
    if isinstance(copies, Pin):
        return [copies]
    if tensor == node.input[0]:
        return through(index.label(node), node.input[0], node.output[0], placement, placement.repeated(copies))
    return _gathered_effects(index, node, node.output[0], node.input[0], placement, copies)
