"""The analysis's worklist engine: grow one space from its producer over every tensor that
carries its units, applying the op rules of `onnxprune.rules` (DESIGN §3).

The engine knows no op: it asks the rules what a producer creates, whether a reader is a linear
layer, and what every other node implies, and records the answers in the Space. A tensor whose
placement changes is visited again; anything a rule cannot follow pins the space with a reason.
"""

from __future__ import annotations

import fnmatch
from collections import deque

import numpy as np
import onnx

from .graph import IMPLICIT, GraphIndex, get_attr
from .ops import op_key
from .placement import Placement, Segment
from .rules import CARRY, CONSUME, PRODUCE, Carry, Coarsen, Effect, Flattened, Lock, Pin, Produced, SizeFollows, SizeRead, Through
from .rules.registry import slice_param, through
from .spaces import (
    CACHE_NAME,
    AttrUpdate,
    BroadcastUpdate,
    CacheIO,
    Consumer,
    DerivedFrom,
    IndexUpdate,
    ParamSlice,
    RecurrentRead,
    ShapeUpdate,
    Space,
    WindowUpdate,
)

RECORDS = {ParamSlice: "slices", AttrUpdate: "attrs", ShapeUpdate: "reshapes", WindowUpdate: "windows", IndexUpdate: "indices", BroadcastUpdate: "broadcasts",
           RecurrentRead: "recurrent_reads"}


def _slice_axes(index: GraphIndex, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """The axes a Slice cuts, when known at analysis time."""
    if len(node.input) > 3 and node.input[3]:
        axes = index.const(node.input[3])
        return None if axes is None else [int(a) % rank for a in np.atleast_1d(axes)]
    starts = index.shape(node.input[1])
    return None if starts is None or len(starts) != 1 or starts[0] is None else list(range(starts[0]))


def append_new(items: list, item) -> None:
    """Append unless already there (records are sets kept in discovery order)."""
    if item not in items:
        items.append(item)


def producer_output(index: GraphIndex, node: onnx.NodeProto) -> Produced | None:
    """(output tensor, unit axis, n) when `node` creates units we can remove, else None."""
    rule = PRODUCE.get(op_key(node))
    return None if rule is None else rule.output(index, node)


class Regrow(Exception):  # noqa: N818 - control flow, not an error
    """The units are too fine for a Reshape (columns inside attention heads): regrow with n units."""

    def __init__(self, n: int):
        super().__init__(n)
        self.n = n


class Alias(Exception):  # noqa: N818 - control flow, not an error
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


def root_placement(axis: int, labels: list[int], block: int) -> Placement:
    """The producer's placement when its slots carry the units `labels` (aliased slots repeat units)."""
    segments: list[Segment] = []
    for slot, unit in enumerate(labels):
        last = segments[-1] if segments else None
        if last is not None and last.offset + (last.hi - last.lo) == slot and last.hi == unit:
            segments[-1] = Segment(last.offset, last.lo, unit + 1)
        else:
            segments.append(Segment(slot, unit, unit + 1))
    return Placement(axis, len(labels), tuple(segments), block)


def _fills(placement: Placement, produced: Produced) -> bool:
    """Every slot of the producer's output carries a unit of the space (a C2f bottleneck's conv
    writes the half of the space that its residual Add joins): the producer is sliced there."""
    return placement.axis == produced.axis and placement.size == produced.features and placement.count() == placement.width


class Grower:
    """Flood fill from one producer output over every tensor that carries its units."""

    def __init__(self, index: GraphIndex, space: Space, claimed: dict[str, list[tuple[int, set[int]]]], exclude: list[str],
                 root: tuple[str, Placement] | None = None):
        self.index = index
        self.space = space
        self.claimed = claimed
        self.exclude = exclude
        self.queue: deque[str] = deque()
        self.root = root  # (producer label, its placement) when it is not the identity
        self.size_reads: list[SizeRead] = []
        self.size_follows: list[SizeFollows] = []

    def pin(self, reason: str) -> None:
        append_new(self.space.pinned, reason)

    def coarsen(self, factor: int, where: str) -> None:
        """Ask for units `factor` times coarser (whole heads instead of columns)."""
        if factor > 1 and self.space.n % factor == 0:
            raise Regrow(self.space.n // factor)
        self.pin(f"{where} splits the units into groups that do not divide {self.space.n}")

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
                    raise Alias(pairs)  # e.g. fused QKV: q-head h and k-head h are one unit
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
            self.backward(name, placement)
            self.forward(name, placement)
        self.check_size_reads()

    def check_size_reads(self) -> None:
        """A size of the units' axis read by Shape must only set target entries that carry the
        units (they are rewritten as constants; the features entry of a flatten into a Gemm,
        also rewritten); any other entry would change with the pruning."""
        for read in self.size_reads:
            node = self.index.node(read.node)
            placement = self.space.tensors.get(node.output[0])
            flat = node.output[0] in self.space.flattened and read.position == 1  # view(x.size(0), x.size(1)) into a Gemm
            if not flat and (placement is None or placement.axis != read.position):
                self.pin(f"Shape '{read.shape}' reads the size of the units' axis into {node.op_type} '{read.node}' entry {read.position}")
        for follows in self.size_follows:
            carried, layout = self.space.tensors.get(follows.tensor), follows.layout
            if carried is None or (carried.axis, carried.width, carried.block, carried.segments) != (follows.axis, layout.width, layout.block, layout.segments):
                self.pin(f"{follows.where} is the size of axis {follows.axis} of '{follows.tensor}', which does not carry these units as the output does")

    def apply(self, effects: list[Effect]) -> None:
        """Carry out a rule's effects, in order."""
        for effect in effects:
            if isinstance(effect, Carry):
                self.add(effect.tensor, effect.placement)
            elif isinstance(effect, Pin):
                self.pin(effect.reason)
            elif isinstance(effect, Lock):
                self.space.locked.update(effect.placement.unit_positions()[0].tolist())
                append_new(self.space.lock_reasons, effect.reason)
            elif isinstance(effect, Through):
                append_new(self.space.pass_through, effect.label)
            elif isinstance(effect, Flattened):
                append_new(self.space.flattened, effect.tensor)
            elif isinstance(effect, Coarsen):
                self.coarsen(effect.factor, effect.where)
            elif isinstance(effect, SizeRead):
                append_new(self.size_reads, effect)
            elif isinstance(effect, SizeFollows):
                append_new(self.size_follows, effect)
            elif isinstance(effect, Consumer):
                append_new(self.space.consumers, effect)
                append_new(self.space.sites, effect.site)
            elif isinstance(effect, DerivedFrom):
                if self.space.derived not in (None, effect):
                    self.pin(f"Gathers '{self.space.derived.node}' and '{effect.node}' both repeat these units")
                self.space.derived = effect
            else:
                append_new(getattr(self.space, RECORDS[type(effect)]), effect)

    def backward(self, name: str, placement: Placement) -> None:
        """Follow the units to the node that wrote `name`: a producer of the space, or an op."""
        index = self.index
        node = index.producer.get(name)
        if node is None:
            if name in index.graph_inputs and CACHE_NAME.search(name):
                append_new(self.space.cache_io, CacheIO(name, True))
            elif name in index.graph_inputs:
                self.pin(f"units come from graph input '{name}'")
            elif index.is_constant(name):
                self._constant_source(name, placement)
            return
        produced = producer_output(index, node)
        if produced is not None and produced.tensor == name:
            self._producer(node, produced, placement)
            return
        if produced is not None and index.label(node) in self.space.producers:
            return  # another output of one of the space's producers (a recurrent op's last state): its rule carries it
        if node.op_type in ("Concat", "Split", "Slice"):
            rank = index.rank(name)
            axis = get_attr(node, "axis", 0) if node.op_type != "Slice" else None
            if node.op_type == "Concat" and rank is not None and axis % rank != placement.axis:
                self.visit(node, name, placement)  # joins along another axis (KV cache): same units in every input
            elif node.op_type == "Split" and rank is not None and axis % rank != placement.axis:
                self.visit(node, name, placement)  # every part of a split along another axis has the units
            elif node.op_type == "Slice" and rank is not None and placement.axis not in (_slice_axes(index, node, rank) or [placement.axis]):
                self.apply(through(index.label(node), node.input[0], name, placement))  # cuts another axis (partial rotary)
            elif not any(i in self.space.tensors for i in node.input):  # reached by coupling, not by a forward step
                self.pin(f"{node.op_type} '{index.label(node)}' feeds a tensor coupled to these units")
            return
        self.visit(node, name, placement)

    def _constant_source(self, name: str, placement: Placement) -> None:
        """Units reached backwards at a constant (a relative-position bias table folded by the
        exporter, then reshaped per head): its one reader gets it sliced like a per-unit
        parameter; a constant read elsewhere too pins."""
        uses = self.index.uses.get(name, [])
        if len(uses) != 1 or uses[0].index < 0:
            self.pin(f"units come from constant '{name}'")
            return
        self.apply(slice_param(self.index, uses[0].node, uses[0].index, placement.axis, name, placement, per_element=True))

    def _producer(self, node: onnx.NodeProto, produced: Produced, placement: Placement) -> None:
        label = self.index.label(node)
        if self.root is not None and label == self.root[0]:
            expected = self.root[1]
        elif produced.features % self.space.n == 0:
            expected = Placement.identity(produced.axis, self.space.n, produced.features // self.space.n)
        else:
            expected = None
        if placement != expected and not _fills(placement, produced):
            self.pin(f"producer '{label}' writes {produced.features} units that only partly belong to this space")
            return
        if label not in self.space.producers:
            self.space.producers.append(label)
            self.apply(PRODUCE[op_key(node)].slices(self.index, node, self.space.n))
        if any(fnmatch.fnmatchcase(label, pattern) for pattern in self.exclude):
            self.pin(f"producer '{label}' is excluded by --exclude")

    def forward(self, name: str, placement: Placement) -> None:
        """Follow the units to every reader of `name`: linear layers absorb them, other ops carry them."""
        index = self.index
        if name in index.graph_outputs and CACHE_NAME.search(name):
            append_new(self.space.cache_io, CacheIO(name, False))
        elif name in index.graph_outputs:
            self.pin(f"tensor '{name}' is a graph output")
        for use in index.uses.get(name, []):
            if use.index == IMPLICIT:
                self.pin(f"{use.node.op_type} '{index.label(use.node)}' reads the units inside its subgraph (If/Loop/Scan bodies are not followed)")
                continue
            rule = CONSUME.get(op_key(use.node))
            effects = None if rule is None else rule(index, use.node, use.index, name, placement)
            if effects is None:
                self.visit(use.node, name, placement)
            else:
                self.apply(effects)

    def visit(self, node: onnx.NodeProto, name: str, placement: Placement) -> None:
        """An op that units reach on tensor `name`: apply its carry rule."""
        index, op = self.index, op_key(node)
        label = index.label(node)
        extra_outputs = [o for o in node.output[1:] if index.is_read(o)]
        if extra_outputs and op != "Split":
            self.pin(f"{op} '{label}' output '{extra_outputs[0]}' is used")
            return
        rule = CARRY.get(op)
        if rule is None:
            self.pin(f"{op} '{label}' on the unit axis is not supported")
            return
        self.apply(rule(index, node, name, placement))
