"""Graph analysis: find the prunable spaces (DESIGN §3).

A *space* is a set of n units that must be removed together: the output channels of its
producers, carried through pass-through ops (whose per-unit constants are sliced) to the
consumers whose input weights absorb the least-squares recovery. Spaces are grown by a
flood fill over the tensors that carry the unit axis; residual Add/Mul of two unit tensors
merges them. Anything the fill does not understand pins the whole space.
"""

from __future__ import annotations

import fnmatch
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GraphIndex, Shape, get_attr
from .ops import (
    BROADCAST_ELEMENTWISE,
    CHANNEL_PARAM_OPS,
    CHANNEL_WISE,
    REDUCE_OPS,
    UNARY_PASS_THROUGH,
)


@dataclass(frozen=True)
class ParamSlice:
    """A constant input of a node that is indexed by the space's units along `axis`."""

    node: str
    input_index: int
    axis: int


@dataclass(frozen=True)
class AttrUpdate:
    """An integer attribute that must equal the kept unit count (depthwise Conv's group)."""

    node: str
    attribute: str


@dataclass(frozen=True)
class ShapeUpdate:
    """A Reshape target whose entry `position` equals units x `block` (Flatten into a Gemm)."""

    node: str
    input_index: int
    position: int
    block: int


@dataclass(frozen=True)
class Consumer:
    """A linear op that reads the space's units and absorbs the recovery into its weight.

    The weight's unit axis `in_axis` is `block` features per unit (Flatten of C x H x W into
    a Gemm: block = H*W, unit c owns features c*block .. (c+1)*block - 1).
    """

    node: str
    op_type: str
    weight_index: int
    in_axis: int
    out_axis: int
    site: str
    block: int = 1


@dataclass(frozen=True)
class Site:
    """An activation tensor whose units feed consumers: statistics are gathered here."""

    tensor: str
    axis: int
    n: int


@dataclass
class Space:
    """Units that are pruned together, with everything a rewrite must touch."""

    id: int
    name: str
    n: int
    producers: list[str] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    attrs: list[AttrUpdate] = field(default_factory=list)
    reshapes: list[ShapeUpdate] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    tensors: dict[str, int] = field(default_factory=dict)
    flattened: list[str] = field(default_factory=list)
    pass_through: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.pinned

    def site(self, tensor: str) -> Site:
        return next(s for s in self.sites if s.tensor == tensor)


@dataclass
class Analysis:
    """All spaces of a model; spaces with a non-empty `pinned` list are never pruned."""

    spaces: list[Space]

    @property
    def prunable(self) -> list[Space]:
        return [s for s in self.spaces if s.prunable]

    @property
    def pinned(self) -> list[Space]:
        return [s for s in self.spaces if not s.prunable]


def producer_output(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, int, int] | None:
    """(output tensor, unit axis, n) when `node` creates units we can remove, else None."""
    op = node.op_type
    if op == "Conv" and index.is_constant(node.input[1]):
        weight = index.const(node.input[1])
        group = get_attr(node, "group", 1)
        if group == 1 and weight.ndim >= 3:
            return node.output[0], 1, int(weight.shape[0])
    if op == "Gemm" and index.is_constant(node.input[1]) and not get_attr(node, "transA", 0):
        weight = index.const(node.input[1])
        if weight.ndim == 2 and (len(node.input) < 3 or not node.input[2] or index.is_constant(node.input[2])):
            return node.output[0], 1, int(weight.shape[0] if get_attr(node, "transB", 0) else weight.shape[1])
    if op == "MatMul" and index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
        weight = index.const(node.input[1])
        rank = index.rank(node.output[0])
        if weight.ndim == 2 and rank is not None:
            return node.output[0], rank - 1, int(weight.shape[1])
    return None


def _producer_slices(index: GraphIndex, node: onnx.NodeProto, n: int) -> list[ParamSlice]:
    label = index.label(node)
    if node.op_type == "Conv":
        slices = [ParamSlice(label, 1, 0)]
        if len(node.input) > 2 and node.input[2]:
            slices.append(ParamSlice(label, 2, 0))
        return slices
    if node.op_type == "Gemm":
        slices = [ParamSlice(label, 1, 0 if get_attr(node, "transB", 0) else 1)]
        if len(node.input) > 2 and node.input[2]:
            bias = index.const(node.input[2])
            if bias.ndim >= 1 and bias.shape[-1] == n:
                slices.append(ParamSlice(label, 2, bias.ndim - 1))
        return slices
    return [ParamSlice(label, 1, 1)]  # MatMul


class _Grower:
    """Flood fill from one producer output over every tensor that carries its unit axis."""

    def __init__(self, index: GraphIndex, space: Space, claimed: dict[str, int], exclude: list[str]):
        self.index = index
        self.space = space
        self.claimed = claimed
        self.exclude = exclude
        self.queue: deque[str] = deque()
        self.visited_nodes: set[int] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def pin(self, reason: str) -> None:
        if reason not in self.space.pinned:
            self.space.pinned.append(reason)

    def add_tensor(self, name: str, axis: int) -> None:
        known = self.space.tensors.get(name)
        if known is not None:
            if known != axis:
                self.pin(f"tensor '{name}' carries the units on two different axes")
            return
        owner = self.claimed.get(name)
        if owner is not None and owner != self.space.id:
            self.pin(f"tensor '{name}' is shared with another space")
            return
        shape = self.index.shape(name)
        if shape is not None and axis < len(shape) and shape[axis] not in (None, self.space.n):
            self.pin(f"tensor '{name}' has {shape[axis]} units on axis {axis}, expected {self.space.n}")
            return
        self.space.tensors[name] = axis
        self.claimed[name] = self.space.id
        self.queue.append(name)

    def run(self) -> None:
        while self.queue:
            name = self.queue.popleft()
            axis = self.space.tensors[name]
            self._backward(name, axis)
            self._forward(name, axis)

    # -- traversal ---------------------------------------------------------------------------
    def _backward(self, name: str, axis: int) -> None:
        node = self.index.producer.get(name)
        if node is None:
            if name in self.index.graph_inputs:
                self.pin(f"units come from graph input '{name}'")
            return
        if id(node) in self.visited_nodes:
            return
        produced = producer_output(self.index, node)
        if produced is not None and produced[0] == name:
            self.visited_nodes.add(id(node))
            label = self.index.label(node)
            if produced[2] != self.space.n:
                self.pin(f"producer '{label}' has {produced[2]} units, expected {self.space.n}")
            self.space.producers.append(label)
            self.space.slices.extend(_producer_slices(self.index, node, self.space.n))
            if any(fnmatch.fnmatchcase(label, pattern) for pattern in self.exclude):
                self.pin(f"producer '{label}' is excluded by --exclude")
            return
        self._visit_elementwise(node, name, axis)

    def _forward(self, name: str, axis: int) -> None:
        if name in self.index.graph_outputs:
            self.pin(f"tensor '{name}' is a graph output")
        for use in self.index.uses.get(name, []):
            node = use.node
            if id(node) in self.visited_nodes:
                continue
            if self._try_consumer(node, use.index, name, axis):
                continue
            self._visit_elementwise(node, name, axis)

    def _try_consumer(self, node: onnx.NodeProto, slot: int, name: str, axis: int) -> bool:
        index, op = self.index, node.op_type
        label = index.label(node)
        rank = index.rank(name)
        if op == "Conv" and slot == 0 and index.is_constant(node.input[1]):
            group = get_attr(node, "group", 1)
            weight = index.const(node.input[1])
            if group != 1:
                return False  # depthwise is a pass-through; other groups pin below
            self.visited_nodes.add(id(node))
            if axis != 1:
                self.pin(f"Conv '{label}' reads the units on axis {axis}, not the channel axis")
                return True
            if weight.shape[1] != self.space.n:
                self.pin(f"Conv '{label}' weight has {weight.shape[1]} input channels, expected {self.space.n}")
                return True
            self._add_consumer(Consumer(label, op, 1, 1, 0, name), name, axis)
            return True
        linear = self._linear_weight_axes(node, slot)
        if linear is not None:
            self.visited_nodes.add(id(node))
            if rank is None or axis != rank - 1:
                self.pin(f"{op} '{label}' does not reduce over the units' axis")
                return True
            in_axis, out_axis = linear
            if index.const(node.input[1]).shape[in_axis] != self.space.n:
                self.pin(f"{op} '{label}' weight does not match {self.space.n} units")
                return True
            self._add_consumer(Consumer(label, op, 1, in_axis, out_axis, name), name, axis)
            return True
        if op in ("Flatten", "Reshape") and slot == 0:
            self.visited_nodes.add(id(node))
            self._flatten_into_linear(node, name, axis)
            return True
        return False

    def _linear_weight_axes(self, node: onnx.NodeProto, slot: int) -> tuple[int, int] | None:
        """(in_axis, out_axis) of the constant weight when `node` is Gemm/MatMul reading slot 0."""
        index = self.index
        if slot != 0 or len(node.input) < 2 or not index.is_constant(node.input[1]):
            return None
        weight = index.const(node.input[1])
        if weight.ndim != 2:
            return None
        if node.op_type == "Gemm" and not get_attr(node, "transA", 0):
            return (1, 0) if get_attr(node, "transB", 0) else (0, 1)
        if node.op_type == "MatMul":
            return 0, 1
        return None

    def _flatten_into_linear(self, node: onnx.NodeProto, name: str, axis: int) -> None:
        index, label = self.index, self.index.label(node)
        shape = index.shape(name)
        if shape is None or axis != 1 or len(shape) < 2:
            self.pin(f"{node.op_type} '{label}' mixes the units' axis")
            return
        reshape_update = None
        if node.op_type == "Flatten":
            if get_attr(node, "axis", 1) != 1:
                self.pin(f"Flatten '{label}' does not flatten from the channel axis")
                return
        else:
            target = index.const(node.input[1]) if len(node.input) > 1 else None
            if target is None or target.ndim != 1 or len(target) != 2:
                self.pin(f"Reshape '{label}' has a computed or non-2-D target shape")
                return
            batch = shape[0]
            if int(target[0]) not in (0, -1) and (batch is None or int(target[0]) != batch):
                self.pin(f"Reshape '{label}' mixes the batch and unit axes")
                return
            if int(target[1]) != -1:
                reshape_update = int(target[1])
        flat = node.output[0]
        uses = index.uses.get(flat, [])
        if flat in index.graph_outputs or not uses:
            self.pin(f"{node.op_type} '{label}' output is not read by a linear layer")
            return
        consumers = []
        for use in uses:
            axes = self._linear_weight_axes(use.node, use.index)
            if axes is None:
                self.pin(f"{node.op_type} '{label}' feeds {use.node.op_type} '{index.label(use.node)}', not a Gemm/MatMul")
                return
            features = index.const(use.node.input[1]).shape[axes[0]]
            if features % self.space.n:
                self.pin(f"{use.node.op_type} '{index.label(use.node)}' has {features} inputs, not a multiple of {self.space.n}")
                return
            consumers.append((use.node, axes, features // self.space.n))
        blocks = {b for _, _, b in consumers}
        spatial = [d for d in shape[2:]]
        if len(blocks) != 1 or (None not in spatial and int(np.prod(spatial, dtype=np.int64)) not in blocks):
            self.pin(f"{node.op_type} '{label}' feature count does not match channels x spatial size")
            return
        block = blocks.pop()
        if reshape_update is not None:
            if reshape_update != self.space.n * block:
                self.pin(f"Reshape '{label}' target {reshape_update} is not {self.space.n} x {block}")
                return
            self.space.reshapes.append(ShapeUpdate(label, 1, 1, block))
        self.space.pass_through.append(label)
        self.space.flattened.append(flat)
        for consumer_node, (in_axis, out_axis), _ in consumers:
            self.visited_nodes.add(id(consumer_node))
            consumer = Consumer(index.label(consumer_node), consumer_node.op_type, 1, in_axis, out_axis, name, block)
            self._add_consumer(consumer, name, axis)

    def _add_consumer(self, consumer: Consumer, tensor: str, axis: int) -> None:
        if self.index.rank(tensor) is None:
            self.pin(f"tensor '{tensor}' read by '{consumer.node}' has an unknown rank")
            return
        self.space.consumers.append(consumer)
        if all(s.tensor != tensor for s in self.space.sites):
            self.space.sites.append(Site(tensor, axis, self.space.n))

    def _visit_elementwise(self, node: onnx.NodeProto, name: str, axis: int) -> None:
        """Pass-through ops: slice their per-unit constants and follow every unit tensor."""
        index, op = self.index, node.op_type
        label = index.label(node)
        self.visited_nodes.add(id(node))
        out_rank = index.rank(node.output[0]) if node.output else None
        extra_outputs = [o for o in node.output[1:] if o and (index.uses.get(o) or o in index.graph_outputs)]
        if extra_outputs:
            self.pin(f"{op} '{label}' output '{extra_outputs[0]}' is used")
            return
        if op in UNARY_PASS_THROUGH or op in CHANNEL_WISE or op in CHANNEL_PARAM_OPS:
            if (op in CHANNEL_WISE or op in CHANNEL_PARAM_OPS) and axis != 1:
                self.pin(f"{op} '{label}' acts on axis 1, the units are on axis {axis}")
                return
            if op in CHANNEL_PARAM_OPS:
                for slot in CHANNEL_PARAM_OPS[op]:
                    if slot < len(node.input) and node.input[slot]:
                        self._slice_param(node, slot, param_axis=0)
            elif op == "PRelu":
                self._broadcast_inputs(node, name, axis, out_rank)
                return
            self._record_pass_through(label)
            self.add_tensor(node.input[0], axis)
            self.add_tensor(node.output[0], axis)
            return
        if op == "Conv" and self._is_depthwise(node):
            if axis != 1:
                self.pin(f"depthwise Conv '{label}' acts on axis 1, the units are on axis {axis}")
                return
            self._slice_param(node, 1, param_axis=0)
            if len(node.input) > 2 and node.input[2]:
                self._slice_param(node, 2, param_axis=0)
            self.space.attrs.append(AttrUpdate(label, "group"))
            self._record_pass_through(label)
            self.add_tensor(node.input[0], axis)
            self.add_tensor(node.output[0], axis)
            return
        if op in BROADCAST_ELEMENTWISE:
            self._broadcast_inputs(node, name, axis, out_rank)
            return
        if op in REDUCE_OPS:
            self._reduce(node, axis)
            return
        if op == "Pad":
            self._pad(node, axis)
            return
        if op == "Resize":
            self._resize(node, axis)
            return
        reason = f"{op} '{label}' on the unit axis is not supported"
        if op == "Conv":
            reason = f"grouped Conv '{label}' (group={get_attr(node, 'group', 1)}) couples units in blocks"
        self.pin(reason)

    def _is_depthwise(self, node: onnx.NodeProto) -> bool:
        weight = self.index.const(node.input[1])
        group = get_attr(node, "group", 1)
        return weight is not None and group > 1 and weight.shape[0] == group and weight.shape[1] == 1

    def _record_pass_through(self, label: str) -> None:
        if label not in self.space.pass_through:
            self.space.pass_through.append(label)

    def _slice_param(self, node: onnx.NodeProto, slot: int, param_axis: int) -> None:
        label = self.index.label(node)
        value = self.index.const(node.input[slot])
        if value is None:
            self.pin(f"{node.op_type} '{label}' input '{node.input[slot]}' is not a constant")
            return
        if value.ndim <= param_axis or value.shape[param_axis] != self.space.n:
            self.pin(f"{node.op_type} '{label}' parameter '{node.input[slot]}' is not per-unit")
            return
        self.space.slices.append(ParamSlice(label, slot, param_axis))

    def _broadcast_inputs(self, node: onnx.NodeProto, name: str, axis: int, out_rank: int | None) -> None:
        """Inputs are aligned from the right (numpy broadcasting): slice constants, couple tensors."""
        index, label = self.index, self.index.label(node)
        rank = index.rank(name)
        if rank is None or out_rank is None:
            self.pin(f"{node.op_type} '{label}' has inputs of unknown rank")
            return
        from_right = axis - rank
        if out_rank + from_right < 0:
            self.pin(f"{node.op_type} '{label}' broadcasting is unclear")
            return
        first_data = 1 if node.op_type == "Where" else 0  # Where's condition is a data input too
        for slot, inp in enumerate(node.input):
            if not inp or inp == name:
                continue
            value = index.const(inp)
            if value is not None:
                pos = value.ndim + from_right
                if pos < 0 or value.shape[pos] == 1:
                    continue
                if value.shape[pos] == self.space.n:
                    self.space.slices.append(ParamSlice(label, slot, pos))
                    continue
                self.pin(f"{node.op_type} '{label}' constant '{inp}' does not broadcast over {self.space.n} units")
                return
            shape = index.shape(inp)
            if shape is None:
                self.pin(f"{node.op_type} '{label}' input '{inp}' has an unknown shape")
                return
            pos = len(shape) + from_right
            if pos < 0 or shape[pos] == 1:
                continue  # the same value for every unit: channel-independent
            if slot < first_data or shape[pos] != self.space.n:
                self.pin(f"{node.op_type} '{label}' input '{inp}' mixes units")
                return
            self.add_tensor(inp, pos)
        self._record_pass_through(label)
        self.add_tensor(name, axis)
        self.add_tensor(node.output[0], out_rank + from_right)

    def _reduce(self, node: onnx.NodeProto, axis: int) -> None:
        index, label = self.index, self.index.label(node)
        rank = index.rank(node.input[0])
        axes = get_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = index.const(node.input[1])
            if value is None:
                self.pin(f"{node.op_type} '{label}' has computed axes")
                return
            axes = value.tolist()
        if rank is None or not axes:
            self.pin(f"{node.op_type} '{label}' reduces over every axis")
            return
        axes = [a % rank for a in axes]
        if axis in axes:
            self.pin(f"{node.op_type} '{label}' reduces over the units' axis")
            return
        out_axis = axis if get_attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)
        self._record_pass_through(label)
        self.add_tensor(node.input[0], axis)
        self.add_tensor(node.output[0], out_axis)

    def _pad(self, node: onnx.NodeProto, axis: int) -> None:
        index, label = self.index, self.index.label(node)
        pads = get_attr(node, "pads")
        if pads is None and len(node.input) > 1:
            value = index.const(node.input[1])
            pads = None if value is None else value.tolist()
        rank = index.rank(node.input[0])
        axes_given = len(node.input) > 3 and node.input[3]
        if pads is None or rank is None or axes_given or len(pads) != 2 * rank:
            self.pin(f"Pad '{label}' has pads onnxprune cannot read")
            return
        if pads[axis] or pads[axis + rank]:
            self.pin(f"Pad '{label}' pads the units' axis")
            return
        self._record_pass_through(label)
        self.add_tensor(node.input[0], axis)
        self.add_tensor(node.output[0], axis)

    def _resize(self, node: onnx.NodeProto, axis: int) -> None:
        index, label = self.index, self.index.label(node)
        scales = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        sizes_given = len(node.input) > 3 and node.input[3]
        if sizes_given or scales is None or scales.size <= axis or scales[axis] != 1:
            self.pin(f"Resize '{label}' does not keep the units' axis as it is (needs constant scales)")
            return
        self._record_pass_through(label)
        self.add_tensor(node.input[0], axis)
        self.add_tensor(node.output[0], axis)


def analyse(
    model: onnx.ModelProto,
    exclude: list[str] | None = None,
    shapes: dict[str, Shape] | None = None,
    index: GraphIndex | None = None,
) -> Analysis:
    """Find every space of units in the model; pinned spaces carry the reasons."""
    index = index or GraphIndex(model, shapes)
    claimed: dict[str, int] = {}
    spaces: list[Space] = []
    for node in index.nodes:
        produced = producer_output(index, node)
        if produced is None or produced[0] in claimed:
            continue
        out, axis, n = produced
        space = Space(id=len(spaces), name=index.label(node), n=n)
        grower = _Grower(index, space, claimed, list(exclude or []))
        grower.add_tensor(out, axis)
        grower.run()
        if not space.consumers and not space.pinned:
            space.pinned.append("no linear layer reads these units")
        spaces.append(space)
    return Analysis(spaces)
