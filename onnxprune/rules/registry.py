"""The op-rule registry: what each op type does with a space's units.

A *carry rule* is called when units reach one of a node's tensors (an input, or the output when
the fill comes back from a consumer's side); it returns the effects that arrival implies, in
order: tensors that carry the units too (`Carry`), per-unit constants and shape entries to edit
(the records of `onnxprune.spaces`), or a `Pin` with the reason the space cannot be pruned. A
*consumer rule* says whether a node reading the units absorbs the recovery (a linear layer), and a
*producer rule* whether a node creates units. Rules are pure functions of the graph index, the
node and the placement; the engine (`onnxprune.grow`) applies their effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import onnx

from ..graph import GraphIndex, get_attr
from ..placement import Placement
from ..spaces import AttrUpdate, BroadcastUpdate, Consumer, DerivedFrom, IndexUpdate, ParamSlice, RecurrentRead, ShapeUpdate, WindowUpdate


@dataclass(frozen=True)
class Carry:
    """`tensor` carries the space's units at `placement`."""

    tensor: str
    placement: Placement


@dataclass(frozen=True)
class Pin:
    """The space cannot be pruned, for `reason`."""

    reason: str


@dataclass(frozen=True)
class Lock:
    """The space's units at `placement` must always be kept, for `reason` (the one KV head that
    multi-query attention repeats for every query head): the others stay prunable."""

    placement: Placement
    reason: str


@dataclass(frozen=True)
class Through:
    """Node `label` passes the units on (reported as a pass-through of the space)."""

    label: str


@dataclass(frozen=True)
class Flattened:
    """`tensor` holds the units flattened with their spatial positions (C x H x W features)."""

    tensor: str


@dataclass(frozen=True)
class Coarsen:
    """`where` groups `factor` units into one index: regrow the space with coarser units, or pin."""

    factor: int
    where: str


@dataclass(frozen=True)
class SizeRead:
    """`shape` reads the size of the units' axis into entry `position` of the target of the
    Reshape/Expand `node`: that output must carry the units on that axis, so the entry is
    rewritten as a constant (the engine checks once the space is grown)."""

    shape: str
    node: str
    position: int


@dataclass(frozen=True)
class SizeFollows:
    """A Reshape/Expand target entry (`where`) is the size of `tensor`'s axis `axis` read at run
    time, so it follows the pruning by itself if that axis carries the units exactly as the
    target's output does (`layout`): the engine checks once the space is grown."""

    tensor: str
    axis: int
    layout: Placement
    where: str


Effect = (Carry | Pin | Lock | Through | Flattened | Coarsen | SizeRead | SizeFollows | ParamSlice | AttrUpdate | ShapeUpdate | WindowUpdate | IndexUpdate
          | BroadcastUpdate | Consumer | RecurrentRead | DerivedFrom)
CarryRule = Callable[[GraphIndex, onnx.NodeProto, str, Placement], list[Effect]]
ConsumerRule = Callable[[GraphIndex, onnx.NodeProto, int, str, Placement], "list[Effect] | None"]


class Produced(NamedTuple):
    """A producer's output tensor, its unit axis and its number of output features."""

    tensor: str
    axis: int
    features: int


@dataclass(frozen=True)
class ProducerRule:
    """How an op creates units: `output` finds them (None: this node does not), `slices` lists
    the effects of creating n units (the parameters to cut; records and pins where needed)."""

    output: Callable[[GraphIndex, onnx.NodeProto], Produced | None]
    slices: Callable[[GraphIndex, onnx.NodeProto, int], list[Effect]]


CARRY: dict[str, CarryRule] = {}
CONSUME: dict[str, ConsumerRule] = {}
PRODUCE: dict[str, ProducerRule] = {}


def _register(table: dict, ops, rule) -> None:
    for op in ops:
        if op in table:
            raise ValueError(f"op {op} already has a rule ({table[op]})")
        table[op] = rule


def carries(*ops: str) -> Callable[[CarryRule], CarryRule]:
    """Decorator: `rule` says how `ops` carry units from the tensor they arrived on."""

    def register(rule: CarryRule) -> CarryRule:
        _register(CARRY, ops, rule)
        return rule

    return register


def consumes(*ops: str) -> Callable[[ConsumerRule], ConsumerRule]:
    """Decorator: `rule` returns the effects of `ops` reading the units as a linear layer, or
    None when this node is not one (it is then followed by its carry rule)."""

    def register(rule: ConsumerRule) -> ConsumerRule:
        _register(CONSUME, ops, rule)
        return rule

    return register


def produces(ops: tuple[str, ...], output, slices) -> None:
    """Register how `ops` create units (see ProducerRule)."""
    _register(PRODUCE, ops, ProducerRule(output, slices))


def through(label: str, inp: str, out: str, placement: Placement, out_placement: Placement | None = None) -> list[Effect]:
    """The usual pass-through: the node's input and output both carry the units."""
    return [Through(label), Carry(inp, placement), Carry(out, out_placement or placement)]


def slice_param(index: GraphIndex, node: onnx.NodeProto, slot: int, param_axis: int, tensor: str, placement: Placement,
                per_element: bool = False) -> list[Effect]:
    """A constant input indexed by unit slot on `param_axis` (a depthwise weight), or by element
    of the unit axis with `per_element` (a BatchNorm scale, also for units of several channels)."""
    label = index.label(node)
    value = index.const(node.input[slot])
    expected = placement.size if per_element else placement.width
    if value is None:
        return [Pin(f"{node.op_type} '{label}' input '{node.input[slot]}' is not a constant")]
    if value.ndim <= param_axis or value.shape[param_axis] != expected:
        return [Pin(f"{node.op_type} '{label}' parameter '{node.input[slot]}' is not per-unit")]
    return [ParamSlice(label, slot, param_axis, tensor)]


def read_by(index: GraphIndex, consumer: Consumer) -> list[Effect]:
    """A linear layer reads the units at `consumer.site` (a statistics site)."""
    if index.rank(consumer.site) is None:
        return [Pin(f"tensor '{consumer.site}' read by '{consumer.node}' has an unknown rank")]
    return [consumer]


def axes_input(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The `axes` of Squeeze/Unsqueeze/Reduce*, from the attribute or a constant input."""
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.const(node.input[1])
        axes = None if value is None else value.tolist()
    return axes

