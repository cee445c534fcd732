"""Graph analysis: find the prunable spaces (DESIGN §3).

A *space* is a set of n units that must be removed together: the output channels of its
producers, carried through pass-through ops (whose per-unit constants are sliced) to the
consumers whose input weights absorb the least-squares recovery. Spaces are grown by a
flood fill over the tensors that carry the units; each tensor records where the units sit on
its unit axis (a Placement: Concat shifts them, Split/Slice cut them). Residual Add/Mul of two
unit tensors couples them into one space. Anything the fill does not understand pins the space.

Every edit is recorded against a tensor: the rewrite removes, from each recorded constant or
shape, the positions of that tensor whose units were pruned (by any space).
"""

from __future__ import annotations

import fnmatch
import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import GraphIndex, get_attr
from .ops import (
    BROADCAST_ELEMENTWISE,
    CHANNEL_PARAM_OPS,
    CHANNEL_WISE,
    REDUCE_OPS,
    UNARY_PASS_THROUGH,
)
from .placement import Placement, Segment


@dataclass(frozen=True)
class ParamSlice:
    """A constant input whose `axis` is indexed like the unit axis of `tensor`."""

    node: str
    input_index: int
    axis: int
    tensor: str


@dataclass(frozen=True)
class AttrUpdate:
    """An integer attribute that must equal the kept width of `tensor` (depthwise Conv's group)."""

    node: str
    attribute: str
    tensor: str


@dataclass(frozen=True)
class ShapeUpdate:
    """Entry `position` of a constant shape input is (kept width of `tensor`) x `block`."""

    node: str
    input_index: int
    position: int
    block: int
    tensor: str
    via: str = ""  # the Reshape whose target a shared Concat builds: the rewrite gives it its own copy


@dataclass(frozen=True)
class WindowUpdate:
    """A Split or Slice on the unit axis of `tensor`: its windows [start, stop) shrink by the
    removed positions inside them."""

    node: str
    tensor: str
    windows: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CacheIO:
    """A graph input or output that carries the units (a KV cache): its shape shrinks too."""

    tensor: str
    is_input: bool


CACHE_NAME = re.compile(r"past|present|cache", re.IGNORECASE)


@dataclass(frozen=True)
class Consumer:
    """A linear op that reads units at `site` and absorbs the recovery into its weight.

    The weight's `in_axis` holds `block` features per position of the site's unit axis
    (Flatten of C x H x W into a Gemm: block = H*W).
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
    """An activation tensor read by consumers; statistics cover its whole unit axis."""

    tensor: str
    axis: int
    width: int


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
    windows: list[WindowUpdate] = field(default_factory=list)
    cache_io: list[CacheIO] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    tensors: dict[str, Placement] = field(default_factory=dict)
    flattened: list[str] = field(default_factory=list)
    pass_through: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.pinned


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

    def sites(self) -> list[Site]:
        """Distinct activation sites of the prunable spaces."""
        found: dict[str, Site] = {}
        for space in self.prunable:
            for tensor in space.sites:
                placement = space.tensors[tensor]
                found.setdefault(tensor, Site(tensor, placement.axis, placement.size))
        return list(found.values())

    def occupancy(self, tensor: str) -> list[tuple[int, int]]:
        """(space id, units of that space on the tensor) for every prunable space on it."""
        return [(s.id, s.tensors[tensor].count()) for s in self.prunable if tensor in s.tensors]


# Element-wise activations with a per-unit bias input (onnxruntime contrib ops): pass-throughs.
BIASED_ACTIVATIONS = frozenset({"PRelu", "FastGelu", "BiasGelu", "QuickGelu"})
HIDDEN_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization"})
FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "DecoderMaskedMultiHeadAttention", "EmbedLayerNormalization"})
AXIS_MOVERS = frozenset({"Transpose", "Reshape", "Flatten", "Expand", "Unsqueeze", "Squeeze", *REDUCE_OPS})


def _append(items: list, item) -> None:
    if item not in items:
        items.append(item)


def producer_output(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, int, int] | None:
    """(output tensor, unit axis, n) when `node` creates units we can remove, else None."""
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.input) > 1 and index.is_constant(node.input[1]):
        dims = index.const_dims(node.input[1])
        if get_attr(node, "group", 1) == 1 and len(dims) >= 3:
            return node.output[0], 1, int(dims[0] if op == "Conv" else dims[1])
    if op == "Gemm" and index.is_constant(node.input[1]) and not get_attr(node, "transA", 0):
        dims = index.const_dims(node.input[1])
        if len(dims) == 2 and (len(node.input) < 3 or not node.input[2] or index.is_constant(node.input[2])):
            return node.output[0], 1, int(dims[0] if get_attr(node, "transB", 0) else dims[1])
    if op == "MatMul" and index.is_constant(node.input[1]) and not index.is_constant(node.input[0]):
        dims = index.const_dims(node.input[1])
        rank = index.rank(node.output[0])
        if len(dims) == 2 and rank is not None:
            return node.output[0], rank - 1, int(dims[1])
    return None


def _producer_slices(index: GraphIndex, node: onnx.NodeProto, n: int) -> list[ParamSlice]:
    label, out = index.label(node), node.output[0]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if node.op_type in ("Conv", "ConvTranspose"):
        slices = [ParamSlice(label, 1, 0 if node.op_type == "Conv" else 1, out)]
        return slices + ([ParamSlice(label, 2, 0, out)] if has_bias else [])
    if node.op_type == "Gemm":
        slices = [ParamSlice(label, 1, 0 if get_attr(node, "transB", 0) else 1, out)]
        bias = index.const(node.input[2]) if has_bias else None
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n:
            slices.append(ParamSlice(label, 2, bias.ndim - 1, out))
        return slices
    return [ParamSlice(label, 1, 1, out)]  # MatMul


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


class _Coarsen(Exception):  # noqa: N818 - control flow, not an error
    """The units are too fine for a Reshape (columns inside attention heads): regrow with n units."""

    def __init__(self, n: int):
        super().__init__(n)
        self.n = n


class _Alias(Exception):  # noqa: N818 - control flow, not an error
    """Two units of the space meet at the same position of a coupled tensor: they are one unit."""

    def __init__(self, pairs: list[tuple[int, int]]):
        super().__init__(pairs)
        self.pairs = pairs


def _aliases(known: Placement, new: Placement) -> list[tuple[int, int]]:
    """Pairs of different units that the two placements put at the same position."""
    if (known.axis, known.width, known.block) != (new.axis, new.width, new.block):
        return []
    at_known = dict(zip(known.unit_positions()[1].tolist(), known.unit_positions()[0].tolist(), strict=True))
    units, positions = new.unit_positions()
    return sorted({(at_known[p], u) for u, p in zip(units.tolist(), positions.tolist(), strict=True) if p in at_known and at_known[p] != u})


def _root_placement(axis: int, labels: list[int], block: int) -> Placement:
    """The producer's placement when its slots carry the units `labels` (aliased slots repeat units)."""
    segments: list[Segment] = []
    for slot, unit in enumerate(labels):
        last = segments[-1] if segments else None
        if last is not None and last.offset + (last.hi - last.lo) == slot and last.hi == unit:
            segments[-1] = Segment(last.offset, last.lo, unit + 1)
        else:
            segments.append(Segment(slot, unit, unit + 1))
    return Placement(axis, len(labels), tuple(segments), block)


class _Grower:
    """Flood fill from one producer output over every tensor that carries its units."""

    def __init__(self, index: GraphIndex, space: Space, claimed: dict[str, list[tuple[int, set[int]]]], exclude: list[str],
                 root: tuple[str, Placement] | None = None):
        self.index = index
        self.space = space
        self.claimed = claimed
        self.exclude = exclude
        self.queue: deque[str] = deque()
        self.root = root  # (producer label, its placement) when it is not the identity

    def coarsen(self, factor: int, where: str) -> None:
        """Ask for units `factor` times coarser (whole heads instead of columns)."""
        if factor > 1 and self.space.n % factor == 0 and (self.root is None or self.root[1].is_identity(self.space.n)):
            raise _Coarsen(self.space.n // factor)
        self.pin(f"{where} splits the units into groups that do not divide {self.space.n}")

    # -- bookkeeping -------------------------------------------------------------------------
    def pin(self, reason: str) -> None:
        _append(self.space.pinned, reason)

    def add(self, name: str, placement: Placement) -> None:
        """Record that `name` carries these units; merge with what is known, re-visit on change."""
        known = self.space.tensors.get(name)
        if known is not None:
            if known == placement:
                return
            merged = known.merged(placement)
            if merged is None:
                pairs = _aliases(known, placement)
                if pairs:
                    raise _Alias(pairs)  # e.g. fused QKV: q-head h and k-head h are one unit
                self.pin(f"tensor '{name}' carries the units at conflicting positions")
                return
            if merged == known:
                return
            placement = merged
        shape = self.index.shape(name)
        if shape is not None and placement.axis < len(shape) and shape[placement.axis] not in (None, placement.size):
            self.pin(f"tensor '{name}' has {shape[placement.axis]} elements on axis {placement.axis}, expected {placement.size}")
            return
        positions = set(placement.unit_positions()[1].tolist())
        for owner, taken in self.claimed.get(name, []):
            if owner != self.space.id and taken & positions:
                self.pin(f"tensor '{name}' is shared with another space")
                return
        self.claimed.setdefault(name, [])
        self.claimed[name] = [(o, t) for o, t in self.claimed[name] if o != self.space.id] + [(self.space.id, positions)]
        self.space.tensors[name] = placement
        self.queue.append(name)

    def run(self) -> None:
        while self.queue:
            name = self.queue.popleft()
            placement = self.space.tensors[name]
            self._backward(name, placement)
            self._forward(name, placement)

    def _record(self, label: str) -> None:
        _append(self.space.pass_through, label)

    # -- traversal ---------------------------------------------------------------------------
    def _backward(self, name: str, placement: Placement) -> None:
        node = self.index.producer.get(name)
        if node is None:
            if name in self.index.graph_inputs and CACHE_NAME.search(name):
                _append(self.space.cache_io, CacheIO(name, True))
            elif name in self.index.graph_inputs:
                self.pin(f"units come from graph input '{name}'")
            return
        produced = producer_output(self.index, node)
        if produced is not None and produced[0] == name:
            label = self.index.label(node)
            out_features = produced[2]
            if self.root is not None and label == self.root[0]:
                expected = self.root[1]
            elif out_features % self.space.n == 0:
                expected = Placement.identity(produced[1], self.space.n, out_features // self.space.n)
            else:
                expected = None
            if placement != expected:
                self.pin(f"producer '{label}' writes {out_features} units that only partly belong to this space")
                return
            if label not in self.space.producers:
                self.space.producers.append(label)
                for cut in _producer_slices(self.index, node, self.space.n):
                    _append(self.space.slices, cut)
            if any(fnmatch.fnmatchcase(label, pattern) for pattern in self.exclude):
                self.pin(f"producer '{label}' is excluded by --exclude")
            return
        if node.op_type in ("Concat", "Split", "Slice"):
            rank = self.index.rank(name)
            axis = get_attr(node, "axis", 0) if node.op_type != "Slice" else None
            if node.op_type == "Concat" and rank is not None and axis % rank != placement.axis:
                self._visit(node, name, placement)  # joins along another axis (KV cache): same units in every input
            elif not any(i in self.space.tensors for i in node.input):  # reached by coupling, not by a forward step
                self.pin(f"{node.op_type} '{self.index.label(node)}' feeds a tensor coupled to these units")
            return
        self._visit(node, name, placement)

    def _forward(self, name: str, placement: Placement) -> None:
        if name in self.index.graph_outputs and CACHE_NAME.search(name):
            _append(self.space.cache_io, CacheIO(name, False))
        elif name in self.index.graph_outputs:
            self.pin(f"tensor '{name}' is a graph output")
        for use in self.index.uses.get(name, []):
            if not self._try_consumer(use.node, use.index, name, placement):
                self._visit(use.node, name, placement)

    def _try_consumer(self, node: onnx.NodeProto, slot: int, name: str, placement: Placement) -> bool:
        index, op = self.index, node.op_type
        label = index.label(node)
        rank = index.rank(name)
        if op in ("Conv", "ConvTranspose") and slot == 0 and len(node.input) > 1 and index.is_constant(node.input[1]):
            if get_attr(node, "group", 1) != 1:
                return False  # depthwise is a pass-through; other groups pin in _visit
            dims = index.const_dims(node.input[1])
            in_axis, out_axis = (1, 0) if op == "Conv" else (0, 1)
            if placement.axis != 1:
                self.pin(f"{op} '{label}' reads the units on axis {placement.axis}, not the channel axis")
            elif dims[in_axis] != placement.size:
                self.pin(f"{op} '{label}' weight has {dims[in_axis]} input channels, expected {placement.size}")
            else:
                self._add_consumer(Consumer(label, op, 1, in_axis, out_axis, name), name)
            return True
        axes = linear_weight_axes(index, node, slot)
        if axes is not None:
            if rank is None or placement.axis != rank - 1:
                self.pin(f"{op} '{label}' does not reduce over the units' axis")
            elif index.const_dims(node.input[1])[axes[0]] != placement.size:
                self.pin(f"{op} '{label}' weight does not match {placement.size} inputs")
            else:
                self._add_consumer(Consumer(label, op, 1, axes[0], axes[1], name), name)
            return True
        if op in ("Flatten", "Reshape") and slot == 0 and self._is_flatten_into_linear(node, name, placement):
            self._flatten_into_linear(node, name, placement)
            return True
        return False

    def _is_flatten_into_linear(self, node: onnx.NodeProto, name: str, placement: Placement) -> bool:
        """Channels of a feature map flattened with their spatial positions (C x H x W) into a
        Gemm/MatMul: positions are treated as samples of the channels (DESIGN §2)."""
        shape, out = self.index.shape(name), self.index.shape(node.output[0])
        return (
            placement.axis == 1 and placement.block == 1 and shape is not None and len(shape) >= 3
            and out is not None and len(out) == 2
        )

    def _flatten_into_linear(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        shape = index.shape(name)
        if shape is None or placement.axis != 1 or len(shape) < 2:
            self.pin(f"{node.op_type} '{label}' mixes the units' axis")
            return
        reshape_target = None
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
            reshape_target = int(target[1])
        flat = node.output[0]
        uses = index.uses.get(flat, [])
        if flat in index.graph_outputs or not uses:
            self.pin(f"{node.op_type} '{label}' output is not read by a linear layer")
            return
        consumers = []
        for use in uses:
            axes = linear_weight_axes(index, use.node, use.index)
            if axes is None:
                self.pin(f"{node.op_type} '{label}' feeds {use.node.op_type} '{index.label(use.node)}', not a Gemm/MatMul")
                return
            features = index.const_dims(use.node.input[1])[axes[0]]
            if features % placement.width:
                self.pin(f"{use.node.op_type} '{index.label(use.node)}' has {features} inputs, not a multiple of {placement.width}")
                return
            consumers.append((use.node, axes, features // placement.width))  # features per channel
        blocks = {b for _, _, b in consumers}
        spatial = list(shape[2:])
        if len(blocks) != 1 or (None not in spatial and int(np.prod(spatial, dtype=np.int64)) not in blocks):
            self.pin(f"{node.op_type} '{label}' feature count does not match channels x spatial size")
            return
        block = blocks.pop()
        if reshape_target is not None and reshape_target != -1:
            if reshape_target != placement.width * block:
                self.pin(f"Reshape '{label}' target {reshape_target} is not {placement.width} x {block}")
                return
            _append(self.space.reshapes, ShapeUpdate(label, 1, 1, block, name))
        self._record(label)
        _append(self.space.flattened, flat)
        for consumer_node, (in_axis, out_axis), _ in consumers:
            consumer = Consumer(index.label(consumer_node), consumer_node.op_type, 1, in_axis, out_axis, name, block)
            self._add_consumer(consumer, name)

    def _add_consumer(self, consumer: Consumer, tensor: str) -> None:
        if self.index.rank(tensor) is None:
            self.pin(f"tensor '{tensor}' read by '{consumer.node}' has an unknown rank")
            return
        _append(self.space.consumers, consumer)
        _append(self.space.sites, tensor)

    def _visit(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """Ops that carry units through: slice their per-unit constants and follow every unit tensor."""
        index, op = self.index, node.op_type
        label = index.label(node)
        extra_outputs = [o for o in node.output[1:] if o and (index.uses.get(o) or o in index.graph_outputs)]
        if extra_outputs and op not in ("Split",):
            self.pin(f"{op} '{label}' output '{extra_outputs[0]}' is used")
            return
        if name not in node.input and op in AXIS_MOVERS:  # reached from the output: map back first
            source = self._input_placement(node, placement)
            if source is None:
                self.pin(f"{op} '{label}' cannot be followed backwards from '{name}'")
                return
            self._visit(node, node.input[0], source)
            return
        axis = placement.axis
        if (op in UNARY_PASS_THROUGH and op != "PRelu" or op in CHANNEL_WISE or op in CHANNEL_PARAM_OPS) and placement.block > 1 and op not in UNARY_PASS_THROUGH:
            self.pin(f"{op} '{label}' acts per channel on units of {placement.block} elements")
            return
        if op in UNARY_PASS_THROUGH and op != "PRelu" or op in CHANNEL_WISE or op in CHANNEL_PARAM_OPS:
            if (op in CHANNEL_WISE or op in CHANNEL_PARAM_OPS) and axis != 1:
                self.pin(f"{op} '{label}' acts on axis 1, the units are on axis {axis}")
                return
            for slot in CHANNEL_PARAM_OPS.get(op, ()):
                if slot < len(node.input) and node.input[slot]:
                    self._slice_param(node, slot, 0, node.input[0], placement)
            self._through(label, node.input[0], node.output[0], placement)
            return
        if op == "Conv" and self._is_depthwise(node):
            if axis != 1:
                self.pin(f"depthwise Conv '{label}' acts on axis 1, the units are on axis {axis}")
                return
            self._slice_param(node, 1, 0, node.input[0], placement)
            if len(node.input) > 2 and node.input[2]:
                self._slice_param(node, 2, 0, node.input[0], placement)
            _append(self.space.attrs, AttrUpdate(label, "group", node.input[0]))
            self._through(label, node.input[0], node.output[0], placement)
            return
        handlers = {
            "Concat": self._concat, "Split": self._split, "Slice": self._slice, "Pad": self._pad, "Resize": self._resize,
            "Reshape": self._reshape, "Flatten": self._reshape, "Transpose": self._transpose, "Unsqueeze": self._unsqueeze,
            "Squeeze": self._squeeze, "Expand": self._expand, "MatMul": self._batched_matmul,
            "Softmax": self._softmax, "LogSoftmax": self._softmax, "Shape": self._shape_reader,
        }
        if op in BROADCAST_ELEMENTWISE or op in BIASED_ACTIVATIONS:
            self._broadcast(node, name, placement)
        elif op in REDUCE_OPS:
            self._reduce(node, placement)
        elif op in handlers:
            handlers[op](node, name, placement)
        elif op == "Conv":
            self.pin(f"grouped Conv '{label}' (group={get_attr(node, 'group', 1)}) couples units in blocks")
        elif op in HIDDEN_NORMS:
            self.pin(f"{op} '{label}' normalises over these units (a transformer's hidden size): not prunable by node pruning")
        elif op in FUSED_ATTENTION:
            self.pin(f"onnxruntime fused op {op} '{label}' hides the heads; export the model without fusion (e.g. before onnxruntime's transformer optimizer)")
        else:
            self.pin(f"{op} '{label}' on the unit axis is not supported")

    def _through(self, label: str, inp: str, out: str, placement: Placement, out_placement: Placement | None = None) -> None:
        self._record(label)
        self.add(inp, placement)
        self.add(out, out_placement or placement)

    def _is_depthwise(self, node: onnx.NodeProto) -> bool:
        if len(node.input) < 2 or not self.index.is_constant(node.input[1]):
            return False
        dims, group = self.index.const_dims(node.input[1]), get_attr(node, "group", 1)
        return group > 1 and dims[0] == group and dims[1] == 1

    def _slice_param(self, node: onnx.NodeProto, slot: int, param_axis: int, tensor: str, placement: Placement) -> None:
        label = self.index.label(node)
        value = self.index.const(node.input[slot])
        if value is None:
            self.pin(f"{node.op_type} '{label}' input '{node.input[slot]}' is not a constant")
        elif value.ndim <= param_axis or value.shape[param_axis] != placement.width:
            self.pin(f"{node.op_type} '{label}' parameter '{node.input[slot]}' is not per-unit")
        else:
            _append(self.space.slices, ParamSlice(label, slot, param_axis, tensor))

    def _broadcast(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """Inputs align from the right (numpy broadcasting): slice constants, couple unit tensors."""
        index, label = self.index, self.index.label(node)
        rank, out_rank = index.rank(name), index.rank(node.output[0])
        if rank is None or out_rank is None:
            self.pin(f"{node.op_type} '{label}' has inputs of unknown rank")
            return
        from_right = placement.axis - rank
        first_data = 1 if node.op_type == "Where" else 0  # Where's condition must not carry units
        for slot, inp in enumerate(node.input):
            if not inp or inp == name:
                continue
            value = index.const(inp)
            dims = value.shape if value is not None else index.shape(inp)
            if dims is None:
                self.pin(f"{node.op_type} '{label}' input '{inp}' has an unknown shape")
                return
            pos = len(dims) + from_right
            if pos < 0 or dims[pos] == 1:
                continue  # the same value for every unit: unit-independent
            if dims[pos] != placement.size or (value is None and slot < first_data):
                self.pin(f"{node.op_type} '{label}' input '{inp}' does not broadcast over {placement.size} elements")
                return
            if value is not None:  # keyed by the output: the same record whichever input led here
                _append(self.space.slices, ParamSlice(label, slot, pos, node.output[0]))
            else:
                self.add(inp, placement.moved(pos))
        self._through(label, name, node.output[0], placement, placement.moved(out_rank + from_right))

    def _reduce(self, node: onnx.NodeProto, placement: Placement) -> None:
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
        axis = placement.axis
        if axis in axes:
            self.pin(f"{node.op_type} '{label}' reduces over the units' axis (an RMSNorm/LayerNorm over a hidden size is not prunable by node pruning)")
            return
        out_axis = axis if get_attr(node, "keepdims", 1) else axis - sum(a < axis for a in axes)
        self._through(label, node.input[0], node.output[0], placement, placement.moved(out_axis))

    def _concat(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        rank = index.rank(node.output[0])
        widths = []
        for inp in node.input:
            shape = index.shape(inp)
            widths.append(None if shape is None or rank is None else shape[placement.axis])
        if rank is None:
            self.pin(f"Concat '{label}' has an output of unknown rank")
            return
        if get_attr(node, "axis", 0) % rank != placement.axis:  # e.g. RoPE halves, KV cache: every input carries the units
            for inp in node.input:
                if index.is_constant(inp):
                    self.pin(f"Concat '{label}' joins the units with a constant '{inp}'")
                    return
                self.add(inp, placement)
            self._through(label, name, node.output[0], placement)
            return
        if placement.block > 1:
            self.pin(f"Concat '{label}' joins along units of {placement.block} elements")
            return
        if None in widths:
            self.pin(f"Concat '{label}' has inputs of unknown width")
            return
        total, offsets = sum(widths), np.cumsum([0, *widths])
        self._record(label)
        for slot, inp in enumerate(node.input):
            if inp == name:
                self.add(node.output[0], placement.shifted(int(offsets[slot]), int(total)))

    def _split_windows(self, node: onnx.NodeProto, width: int) -> list[tuple[int, int]] | None:
        sizes = get_attr(node, "split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            value = self.index.const(node.input[1])
            if value is None:
                return None
            sizes = value.tolist()
        if sizes is None:
            parts = get_attr(node, "num_outputs", len(node.output))
            chunk = -(-width // parts)
            sizes = [min(chunk, width - i * chunk) for i in range(parts)]
        ends = np.cumsum([0, *sizes])
        if ends[-1] != width:
            return None
        return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:], strict=True)]

    def _split(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        rank = index.rank(name)
        if rank is None:
            self.pin(f"Split '{label}' input has an unknown rank")
            return
        if get_attr(node, "axis", 0) % rank != placement.axis:
            self._record(label)
            self.add(node.input[0], placement)
            for out in node.output:
                if out:
                    self.add(out, placement)
            return
        windows = self._split_windows(node, placement.size)
        if windows is not None and placement.block > 1:  # sizes are in elements: whole units only
            if any(a % placement.block or b % placement.block for a, b in windows):
                windows = None
            else:
                windows = [(a // placement.block, b // placement.block) for a, b in windows]
        if windows is None or len(windows) != len(node.output):
            self.pin(f"Split '{label}' has sizes onnxprune cannot read")
            return
        _append(self.space.windows, WindowUpdate(label, name, tuple(windows)))
        self._record(label)
        for out, (start, stop) in zip(node.output, windows, strict=True):
            part = placement.window(start, stop)
            if out and part is not None:
                self.add(out, part)

    def _slice(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        rank = index.rank(name)
        consts = [index.const(i) if i else None for i in node.input[1:]]
        if rank is not None and len(consts) > 2 and consts[2] is not None and placement.axis not in [a % rank for a in consts[2].tolist()]:
            self._through(label, name, node.output[0], placement)  # cuts other axes only (RoPE halves)
            return
        if rank is None or len(consts) < 2 or any(c is None for c in consts):
            self.pin(f"Slice '{label}' has computed or missing starts/ends")
            return
        starts, ends = consts[0].tolist(), consts[1].tolist()
        axes = consts[2].tolist() if len(consts) > 2 else list(range(len(starts)))
        steps = consts[3].tolist() if len(consts) > 3 else [1] * len(starts)
        axes = [a % rank for a in axes]
        if placement.axis not in axes:
            self._through(label, name, node.output[0], placement)
            return
        k = axes.index(placement.axis)
        width = placement.width
        if placement.block > 1:
            self.pin(f"Slice '{label}' cuts units of {placement.block} elements")
            return
        start, stop = (max(0, min(width, v + width if v < 0 else v)) for v in (starts[k], ends[k]))
        if steps[k] != 1 or stop <= start:
            self.pin(f"Slice '{label}' on the unit axis has a step other than 1 or is empty")
            return
        _append(self.space.windows, WindowUpdate(label, name, ((start, stop),)))
        self._record(label)
        part = placement.window(start, stop)
        if part is not None:
            self.add(node.output[0], part)

    def _pad(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        pads = get_attr(node, "pads")
        if pads is None and len(node.input) > 1:
            value = index.const(node.input[1])
            pads = None if value is None else value.tolist()
        rank = index.rank(name)
        axes_given = len(node.input) > 3 and node.input[3]
        if pads is None or rank is None or axes_given or len(pads) != 2 * rank:
            self.pin(f"Pad '{label}' has pads onnxprune cannot read")
        elif pads[placement.axis] or pads[placement.axis + rank]:
            self.pin(f"Pad '{label}' pads the units' axis")
        else:
            self._through(label, name, node.output[0], placement)

    def _resize(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        index, label = self.index, self.index.label(node)
        scales = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        sizes = index.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        axis = placement.axis
        if scales is not None and scales.size > axis and scales[axis] == 1:
            self._through(label, name, node.output[0], placement)
        elif sizes is not None and sizes.size > axis and sizes[axis] == placement.width:
            _append(self.space.reshapes, ShapeUpdate(label, 3, axis, 1, name))
            self._through(label, name, node.output[0], placement)
        else:
            self.pin(f"Resize '{label}' does not keep the units' axis (needs constant scales or sizes)")


    def _static(self, name: str) -> tuple[int, ...] | None:
        shape = self.index.shape(name)
        return None if shape is None or None in shape else tuple(int(d) for d in shape)

    def _map_reshape(self, node: onnx.NodeProto, placement: Placement, from_shape, to_shape) -> Placement | None:
        """Where the units land when a tensor of `from_shape` is reshaped to `to_shape`: the unit
        axis may be split (heads [.., H] -> [.., heads, d]) or merged with the axes after it."""
        label = f"{node.op_type} '{self.index.label(node)}'"
        if from_shape is None or to_shape is None:
            self.pin(f"{label} has a shape onnxprune cannot read")
            return None
        a = placement.axis
        outer, inner = int(np.prod(from_shape[:a], dtype=np.int64)), int(np.prod(from_shape[a + 1:], dtype=np.int64))
        span = placement.block * inner  # elements of one unit slot within one outer block
        candidates = [k for k in range(len(to_shape)) if int(np.prod(to_shape[:k], dtype=np.int64)) == outer and to_shape[k] != 1]
        if not candidates:
            self.pin(f"{label} mixes the units' axis with the axes before it")
            return None
        k = candidates[0]
        t = int(np.prod(to_shape[k + 1:], dtype=np.int64))
        if t % span == 0 and t > span:  # an output index holds several units: use whole groups
            factor = t // span
            if all(seg.offset % factor == 0 and seg.lo % factor == 0 and (seg.hi - seg.lo) % factor == 0 for seg in placement.segments):
                self.coarsen(factor, label)
            self.pin(f"{label} groups units that are not all of this space")
            return None
        if span % t:
            self.pin(f"{label} mixes units with the axes after them")
            return None
        return placement.moved(k, block=span // t, width=placement.width)

    def _reshape(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """Split or merge the unit axis (DESIGN §3); Reshape targets are rewritten."""
        out_placement = self._map_reshape(node, placement, self._static(name), self._static(node.output[0]))
        if out_placement is None:
            return
        if node.op_type == "Reshape":
            self._shape_update(node, out_placement.axis, out_placement.block, node.output[0])
        self._through(self.index.label(node), name, node.output[0], placement, out_placement)

    def _input_placement(self, node: onnx.NodeProto, out_placement: Placement) -> Placement | None:
        """Inverse of the axis-moving ops, for a tensor reached from its consumer's side."""
        op, index = node.op_type, self.index
        inp, out = node.input[0], node.output[0]
        in_rank, out_rank = index.rank(inp), index.rank(out)
        if in_rank is None or out_rank is None:
            self.pin(f"{op} '{index.label(node)}' has an unknown rank")
            return None
        axis = out_placement.axis
        if op == "Transpose":
            perm = get_attr(node, "perm") or list(range(in_rank))[::-1]
            return out_placement.moved(int(perm[axis]))
        if op in ("Reshape", "Flatten"):
            return self._map_reshape(node, out_placement, self._static(out), self._static(inp))
        if op == "Expand":
            return out_placement.moved(axis - (out_rank - in_rank)) if axis >= out_rank - in_rank else None
        if op == "Unsqueeze" or op == "Squeeze" or op in REDUCE_OPS:
            if op == "Unsqueeze":
                axes = self._axes_input(node)
                removed = [] if axes is None else sorted(a % out_rank for a in axes)
                kept = [i for i in range(out_rank) if i not in removed]
                return out_placement.moved(kept.index(axis)) if axes is not None and axis in kept else None
            axes = self._axes_input(node)
            shape = index.shape(inp)
            if axes is None and op == "Squeeze" and shape is not None:
                axes = [i for i, d in enumerate(shape) if d == 1]
            if axes is None:
                return None
            if op != "Squeeze" and get_attr(node, "keepdims", 1):
                return out_placement
            dropped = sorted(a % in_rank for a in axes)
            kept = [i for i in range(in_rank) if i not in dropped]
            return out_placement.moved(kept[axis])
        return out_placement

    def _shape_update(self, node: onnx.NodeProto, position: int, block: int, tensor: str) -> None:
        """Record where the Reshape/Expand target's entry for the unit axis comes from, to rewrite
        it; entries that follow the input by themselves (Reshape 0/-1, Expand 1) need nothing."""
        index, label = self.index, self.index.label(node)
        automatic = {-1, 1} if node.op_type == "Expand" else ({-1} if get_attr(node, "allowzero", 0) else {0, -1})
        target = index.const(node.input[1])
        if target is not None:
            if int(target[position]) in automatic:
                return
            if node.input[1] in index.initializer_names or self._is_constant_node(node.input[1]):
                _append(self.space.reshapes, ShapeUpdate(label, 1, position, block, tensor))
                return
        source = self._shape_source(node.input[1], position)
        if source is None:
            self.pin(f"{node.op_type} '{label}' target entry {position} is computed at run time; onnxprune cannot rewrite it")
            return
        holder = index.node(source[0])
        value = index.const(holder.input[source[1]])
        if int(value[()] if source[2] < 0 else value[source[2]]) in automatic:
            return
        via = label if holder.op_type == "Concat" else ""
        _append(self.space.reshapes, ShapeUpdate(source[0], source[1], source[2], block, tensor, via))

    def _is_constant_node(self, name: str) -> bool:
        producer = self.index.producer.get(name)
        return producer is not None and producer.op_type == "Constant"

    def _shape_source(self, name: str, position: int) -> tuple[str, int, int] | None:
        """(node, input slot, index) of the stored constant that holds entry `position` of a
        shape built by Concat / Unsqueeze / Cast of constants (TorchScript's view(B, S, heads, d))."""
        node = self.index.producer.get(name)
        while node is not None and node.op_type in ("Cast", "Identity"):
            name, node = node.input[0], self.index.producer.get(node.input[0])
        if node is None or node.op_type != "Concat":
            return None
        offset = 0
        for slot, inp in enumerate(node.input):
            length = self._length(inp)
            if length is None:
                return None
            if offset <= position < offset + length:
                inner = self.index.producer.get(inp)
                if inner is not None and inner.op_type == "Unsqueeze" and self.index.is_constant(inner.input[0]):
                    if self.index.const(inner.input[0]).ndim == 0:
                        return self.index.label(inner), 0, -1
                if self.index.is_constant(inp) and (inp in self.index.initializer_names or self._is_constant_node(inp)):
                    return self.index.label(node), slot, position - offset
                return None
            offset += length
        return None

    def _length(self, name: str) -> int | None:
        value = self.index.const(name)
        if value is not None:
            return int(value.size)
        shape = self.index.shape(name)
        return None if shape is None or len(shape) != 1 or shape[0] is None else int(shape[0])

    def _transpose(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        rank = self.index.rank(name)
        perm = get_attr(node, "perm") or list(range(rank or 0))[::-1]
        if rank is None or len(perm) != rank:
            self.pin(f"Transpose '{self.index.label(node)}' has an unknown rank")
            return
        self._through(self.index.label(node), name, node.output[0], placement, placement.moved(list(perm).index(placement.axis)))

    def _axes_input(self, node: onnx.NodeProto) -> list[int] | None:
        axes = get_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.index.const(node.input[1])
            axes = None if value is None else value.tolist()
        return axes

    def _unsqueeze(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        axes, out_rank = self._axes_input(node), self.index.rank(node.output[0])
        if axes is None or out_rank is None:
            self.pin(f"Unsqueeze '{self.index.label(node)}' has computed axes")
            return
        inserted = sorted(a % out_rank for a in axes)
        axis = placement.axis
        for a in inserted:
            if a <= axis:
                axis += 1
        self._through(self.index.label(node), name, node.output[0], placement, placement.moved(axis))

    def _squeeze(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        axes, rank = self._axes_input(node), self.index.rank(name)
        shape = self.index.shape(name)
        if rank is None or (axes is None and shape is None):
            self.pin(f"Squeeze '{self.index.label(node)}' has computed axes")
            return
        removed = [a % rank for a in axes] if axes is not None else [i for i, d in enumerate(shape) if d == 1]
        if placement.axis in removed:
            self.pin(f"Squeeze '{self.index.label(node)}' removes the units' axis")
            return
        self._through(self.index.label(node), name, node.output[0], placement, placement.moved(placement.axis - sum(a < placement.axis for a in removed)))

    def _expand(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        rank, out_rank = self.index.rank(name), self.index.rank(node.output[0])
        out_shape = self.index.shape(node.output[0])
        if rank is None or out_rank is None or out_shape is None:
            self.pin(f"Expand '{self.index.label(node)}' has an unknown shape")
            return
        axis = placement.axis + out_rank - rank
        if out_shape[axis] not in (None, placement.size):
            self.pin(f"Expand '{self.index.label(node)}' broadcasts the units' axis")
            return
        self._shape_update(node, axis, placement.block, node.output[0])
        self._through(self.index.label(node), name, node.output[0], placement, placement.moved(axis))

    def _batched_matmul(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """MatMul of two activations (attention scores, probs @ V): units must sit on a batch axis."""
        index, label = self.index, self.index.label(node)
        ranks = [index.rank(i) for i in node.input]
        out_rank = index.rank(node.output[0])
        if None in ranks or out_rank is None or any(index.is_constant(i) for i in node.input):
            self.pin(f"MatMul '{label}' mixes the units (constant operand on the units' side or unknown rank)")
            return
        rank = index.rank(name)
        from_right = placement.axis - rank
        if from_right >= -2:
            self.pin(f"MatMul '{label}' contracts or mixes the units' axis")
            return
        for inp, r in zip(node.input, ranks, strict=True):
            if inp != name:
                shape = index.shape(inp)
                pos = r + from_right
                if pos >= 0 and shape is not None and shape[pos] not in (1,):
                    self.add(inp, placement.moved(pos))
        self._through(label, name, node.output[0], placement, placement.moved(out_rank + from_right))

    def _shape_reader(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """Shape only reads sizes: fine as long as nothing downstream reads the units' axis size
        (TorchScript's view(x.size(0), x.size(1), heads, d) reads the batch and sequence sizes)."""
        index, label = self.index, self.index.label(node)
        rank = index.rank(name)
        if rank is None:
            self.pin(f"Shape '{label}' of a tensor of unknown rank")
            return
        start, end = get_attr(node, "start", 0) % rank if get_attr(node, "start", 0) else 0, get_attr(node, "end", rank)
        end = end % rank if end < 0 else min(end, rank)
        if not start <= placement.axis < end:
            return
        entry = placement.axis - start
        for use in index.uses.get(node.output[0], []):
            user = use.node
            if user.op_type == "Gather" and use.index == 0 and get_attr(user, "axis", 0) == 0 and index.is_constant(user.input[1]):
                if entry not in [i % (end - start) for i in np.atleast_1d(index.const(user.input[1])).tolist()]:
                    continue
            elif user.op_type == "Slice" and use.index == 0 and all(index.is_constant(i) for i in user.input[1:3]):
                lo, hi = int(index.const(user.input[1])[0]), int(index.const(user.input[2])[0])
                size = end - start
                lo, hi = (max(0, min(size, v + size if v < 0 else v)) for v in (lo, hi))
                if not lo <= entry < hi:
                    continue
            self.pin(f"Shape '{label}' reads the size of the units' axis ({user.op_type} '{index.label(user)}')")
            return

    def _softmax(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        rank = self.index.rank(name)
        axis = get_attr(node, "axis", -1)
        if rank is None or axis % rank == placement.axis:
            self.pin(f"{node.op_type} '{self.index.label(node)}' normalises over the units' axis")
            return
        self._through(self.index.label(node), name, node.output[0], placement)


def analyse(model: onnx.ModelProto, exclude: list[str] | None = None, index: GraphIndex | None = None) -> Analysis:
    """Find every space of units in the model; pinned spaces carry the reasons."""
    index = index or GraphIndex(model)
    claimed: dict[str, list[tuple[int, set[int]]]] = {}
    spaces: list[Space] = []
    for node in index.nodes:
        produced = producer_output(index, node)
        if produced is None or produced[0] in claimed:
            continue
        out, axis, features = produced
        slots = features
        labels = list(range(slots))  # unit of each producer slot (aliases repeat a unit)
        for _ in range(12):  # regrow: coarser units for heads, aliased units for fused QKV
            n = max(labels) + 1
            space = Space(id=len(spaces), name=index.label(node), n=n)
            trial = {k: list(v) for k, v in claimed.items()}
            root = _root_placement(axis, labels, features // slots)
            grower = _Grower(index, space, trial, list(exclude or []), (index.label(node), root))
            try:
                grower.add(out, root)
                grower.run()
            except _Coarsen as coarser:
                if n != slots:  # coarsening after aliasing: start again from whole groups of slots
                    space.pinned.append("units are grouped by a Reshape after being aliased")
                    break
                slots = coarser.n
                labels = list(range(slots))
                continue
            except _Alias as alias:
                labels = _merge_labels(labels, alias.pairs)
                continue
            claimed.clear()
            claimed.update(trial)
            break
        if not space.consumers and not space.pinned:
            space.pinned.append("no linear layer reads these units")
        if len({space.tensors[t].block for t in space.sites}) > 1:
            space.pinned.append("consumers read the units with different layouts")
        spaces.append(space)
    _pin_shared_shape_constants(spaces)
    return Analysis(spaces)


def _merge_labels(labels: list[int], pairs: list[tuple[int, int]]) -> list[int]:
    """Union the aliased units and renumber them 0.. in order of first appearance."""
    parent = list(range(max(labels) + 1))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for a, b in pairs:
        parent[find(a)] = find(b)
    roots = [find(u) for u in labels]
    numbering = {r: i for i, r in enumerate(dict.fromkeys(roots))}
    return [numbering[r] for r in roots]


def _pin_shared_shape_constants(spaces: list[Space]) -> None:
    """A shape constant that must hold the sizes of two different tensors (exporters share one
    Concat between layers and no Reshape owns it) cannot be edited for both: pin those spaces.
    Spaces on the same tensor (a Concat of several spaces) agree on the size and are fine."""
    owners: dict[tuple[str, int, int, str], dict[str, set[int]]] = {}
    for space in spaces:
        for update in space.reshapes:
            owners.setdefault((update.node, update.input_index, update.position, update.via), {}).setdefault(update.tensor, set()).add(space.id)
    for (node, _, _, _), tensors in owners.items():
        if len(tensors) > 1:
            for space in spaces:
                if any(space.id in ids for ids in tensors.values()):
                    _append(space.pinned, f"shape constant of '{node}' is shared with another space")
