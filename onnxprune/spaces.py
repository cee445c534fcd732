"""The analysis's records: spaces of units and every edit a rewrite must make for them.

Every edit is recorded against a tensor: the rewrite removes, from each recorded constant or
shape, the positions of that tensor whose units were pruned (by any space).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from .placement import Placement


@dataclass(frozen=True)
class ParamSlice:
    """A constant input whose `axis` is indexed like the unit axis of `tensor`, `repeats` times
    over (an LSTM's W holds the four gates' rows of every hidden unit one block after another)."""

    node: str
    input_index: int
    axis: int
    tensor: str
    repeats: int = 1


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
    via: str = ""  # the Reshape whose target `node` helps build: the rewrite gives it its own copy, from its Concat down to `node`
    dtype: str = "int64"  # of a computed Concat input replaced by a constant (tf2onnx computes in int32)
    infer: bool = False  # a computed Reshape entry becomes -1: the size may fold in the batch (B x heads)


@dataclass(frozen=True)
class WindowUpdate:
    """A Split or Slice on the unit axis of `tensor`: its windows [start, stop) shrink by the
    removed positions inside them. A Slice whose starts/ends are computed from the axis size
    (TorchScript's chunk) carries their values: the rewrite replaces them with constants."""

    node: str
    tensor: str
    windows: tuple[tuple[int, int], ...]
    bounds: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # a Slice's starts/ends computed from the axis size
    bounds_dtype: str = "int64"


@dataclass(frozen=True)
class IndexUpdate:
    """A Gather whose constant indices permute the unit axis of `tensor` (a channel shuffle,
    `onnxprune.gathers`): the rewrite drops the removed positions from them and renumbers the
    rest. `repeats`: the indices repeat the units of `tensor`, the Gather's input (grouped-query
    attention's repeat_kv): they are renumbered only (the space on the output drops entries)."""

    node: str
    tensor: str
    repeats: bool = False


@dataclass(frozen=True)
class BroadcastUpdate:
    """Input `input_index` of element-wise `node` holds the same values at every index of `axis`
    (T5's zeros bias [1, heads, q, k]): the rewrite gives the node a Slice of it to one index
    there, which broadcasts over the units kept on `tensor` (the other readers keep it whole)."""

    node: str
    input_index: int
    axis: int
    tensor: str


@dataclass(frozen=True)
class DerivedFrom:
    """The space's units reach Gather `node` as its input, each repeated at several positions of
    its `output` (repeat_kv: a KV head for each query head of its group, `picks[j]` the unit at
    position j): a unit goes when the space on the output removes all of its positions, so it
    is never scored or planned itself (`rewrite.pruned_spaces` derives its removal)."""

    node: str
    output: str
    picks: tuple[int, ...]


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
    (Flatten of C x H x W into a Gemm: block = H*W). A Conv's `coverage`: per kernel tap (in
    kernel order), the share of its outputs where the tap reads the input, not padding.
    """

    node: str
    op_type: str
    weight_index: int
    in_axis: int
    out_axis: int
    site: str
    block: int = 1
    coverage: tuple[float, ...] | None = None


@dataclass(frozen=True)
class RecurrentRead:
    """A recurrent op reads its own hidden units back (h_(t-1) through R): the recovery, fitted
    per direction at `site` (the states of every direction side by side), folds into R and Rb.
    Inputs at `zero_states` are zero initial states: dropped (an absent state is zero)."""

    node: str
    site: str
    zero_states: tuple[int, ...] = ()


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
    indices: list[IndexUpdate] = field(default_factory=list)
    broadcasts: list[BroadcastUpdate] = field(default_factory=list)
    cache_io: list[CacheIO] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    recurrent_reads: list[RecurrentRead] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    tensors: dict[str, Placement] = field(default_factory=dict)
    flattened: list[str] = field(default_factory=list)
    pass_through: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    locked: set[int] = field(default_factory=set)  # units always kept (a multi-query KV head), with why
    derived: DerivedFrom | None = None  # removed with the query heads that repeat them (grouped-query KV heads)
    lock_reasons: list[str] = field(default_factory=list)
    # a site written by a spatial mean (an SE block's or a classifier's global pooling) -> the
    # pooled input: one row per sample at the site, but a recovery of every position holds for
    # the mean (`preparation.use_pooled_inputs` switches when the site would be undersampled)
    pooled: dict[str, str] = field(default_factory=dict)

    @property
    def prunable(self) -> bool:
        """Scored and planned: not pinned, and not derived from another space's plan."""
        return not self.pinned and self.derived is None

    def read_pooled_input(self, tensor: str) -> None:
        """The consumers of the pooled site `tensor` take their statistics from its input."""
        source = self.pooled[tensor]
        self.consumers = [dataclasses.replace(c, site=source) if c.site == tensor else c for c in self.consumers]
        self.sites = list(dict.fromkeys(source if t == tensor else t for t in self.sites))


@dataclass
class Analysis:
    """All spaces of a model; spaces with a non-empty `pinned` list are never pruned."""

    spaces: list[Space]

    @property
    def prunable(self) -> list[Space]:
        return [s for s in self.spaces if s.prunable]

    @property
    def pinned(self) -> list[Space]:
        return [s for s in self.spaces if s.pinned]

    @property
    def derived(self) -> list[Space]:
        """Spaces whose units go with another space's (`Space.derived`)."""
        return [s for s in self.spaces if not s.pinned and s.derived is not None]

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
