"""Rewrite: apply a plan to a copy of the model — slice producers and per-unit constants,
fold the least-squares recovery into every consumer, fix shapes (DESIGN §3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .analyse import Analysis, AttrUpdate, Consumer, IndexUpdate, ParamSlice, ShapeUpdate, Space, WindowUpdate
from .folds import FoldMixin, fold_consumer_weight  # noqa: F401 - fold_consumer_weight is part of this module's API
from .graph import (
    SUFFIX,
    Constants,
    GraphIndex,
    copy_model,
    drop_dead_nodes,
    get_attr,
    node_reads,
    read_names,
    remove_initializers,
    unique_name,
    weightless_skeleton,
)
from .placement import expand_blocks, removed_count
from .plan import Plan, SpacePlan, pruned_spaces
from .recovery import Recovery
from .rules.shape_targets import shape_chain
from .spaces import BroadcastUpdate
from .tensors import in_memory


@dataclass
class _Edit:
    node: onnx.NodeProto
    slot: int
    value: np.ndarray | None


def _contiguous(value: np.ndarray) -> np.ndarray:
    """C order, keeping a scalar 0-d (np.ascontiguousarray makes it 1-d: a shape entry of
    Unsqueeze would gain an axis)."""
    return np.ascontiguousarray(value).reshape(np.shape(value))


def _release(edit: _Edit, name: str) -> onnx.TensorProto:
    """The edit as a tensor; its array is let go once written (a large model's edits add up)."""
    tensor = numpy_helper.from_array(_contiguous(edit.value), name)
    edit.value = None
    return tensor


class ConstantEdits:
    """New values for constant inputs, keyed by (node, input slot); shared constants are copied."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex, source: list[onnx.TensorProto], keep_on_disk: bool = False):
        self.keep = (lambda tensor: tensor) if keep_on_disk else in_memory  # how an untouched weight is carried over
        self.model = model
        self.index = index
        self.source = source  # the initializers of the model being rewritten, in order
        self._taken: set[str] | None = None  # every name in use or given, also those not in the graph yet (`_fresh_name`)
        self.edits: dict[tuple[int, int], _Edit] = {}
        self.bias_nodes: list[tuple[onnx.NodeProto, np.ndarray]] = []
        # Reshape -> (it, {holder: (it, {input slot: new value})}): the copies `own_shape` asks for
        self.own_shapes: dict[int, tuple[onnx.NodeProto, dict[int, tuple[onnx.NodeProto, dict[int, np.ndarray]]]]] = {}
        self.narrowed: dict[tuple[int, int], tuple[onnx.NodeProto, int, int]] = {}  # (node, slot) -> (node, slot, axis)

    def narrow(self, label: str, slot: int, axis: int) -> None:
        """Give input `slot` of node `label` one index of `axis` (a Slice): the input is the same
        along it, and broadcasts over however many units its reader keeps (`BroadcastUpdate`)."""
        node = self.index.node(label)
        self.narrowed[(id(node), slot)] = (node, slot, axis)

    def own_shape(self, reshape: onnx.NodeProto, holder: onnx.NodeProto, slot: int, position: int, value: int,
                  dtype: str = "int64") -> None:
        """Give `reshape` its own copy of the shape computation that builds its target, from its
        Concat down to `holder`, with entry `position` (-1: a scalar) of `holder`'s input `slot`
        set to `value` (exporters share one Concat, or one batch x heads product, between layers).
        A slot computed at run time (an axis size read by Shape) becomes a one-entry constant."""
        _, holders = self.own_shapes.setdefault(id(reshape), (reshape, {}))
        _, inputs = holders.setdefault(id(holder), (holder, {}))
        stored = self.index.const(holder.input[slot])
        current = inputs.get(slot, np.zeros(1, dtype=dtype) if stored is None else stored).copy()
        current[() if position < 0 else position] = value
        inputs[slot] = current

    def get(self, label: str, slot: int) -> np.ndarray:
        node = self.index.node(label)
        edit = self.edits.get((id(node), slot))
        return edit.value if edit is not None else self.index.const(node.input[slot])

    def has(self, label: str, slot: int) -> bool:
        """Whether the input exists, given or created by an edit (a bias a fold added)."""
        node = self.index.node(label)
        return (id(node), slot) in self.edits or (slot < len(node.input) and bool(node.input[slot]))

    def set(self, label: str, slot: int, value: np.ndarray) -> None:
        node = self.index.node(label)
        self.edits[(id(node), slot)] = _Edit(node, slot, value)

    def commit(self) -> set[str]:
        """Write the new values; returns the names of constants whose shape may have changed."""
        graph = self.model.graph
        use_count: dict[str, int] = {}
        for node in graph.node:
            for name in node_reads(node):  # a weight a subgraph also reads is never replaced in place
                use_count[name] = use_count.get(name, 0) + 1
        initializers = {t.name: t for t in self.source}
        replaced: dict[str, _Edit] = {}
        fresh: list[tuple[str, _Edit]] = []
        constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        orphans: set[str] = set()
        changed: set[str] = set()
        for edit in self.edits.values():
            name = edit.node.input[edit.slot] if edit.slot < len(edit.node.input) else ""
            changed.add(name)
            if name and use_count.get(name, 0) == 1 and name in initializers:
                replaced[name] = edit
            elif name and use_count.get(name, 0) == 1 and name in constant_nodes:
                node = constant_nodes[name]
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_contiguous(edit.value), name)))
            else:
                new_name = self._fresh_name(f"{name or edit.node.output[0]}{SUFFIX}")
                fresh.append((new_name, edit))
                if name:
                    orphans.add(name)
                    edit.node.input[edit.slot] = new_name
                elif edit.slot < len(edit.node.input):  # an optional input left empty ("") before others
                    edit.node.input[edit.slot] = new_name
                else:
                    while len(edit.node.input) < edit.slot:
                        edit.node.input.append("")
                    edit.node.input.append(new_name)
        for tensor in self.source:  # the source order, edited values in place of the old ones
            graph.initializer.append(_release(replaced[tensor.name], tensor.name) if tensor.name in replaced else self.keep(tensor))
        for name, edit in fresh:
            graph.initializer.append(_release(edit, name))
        self._insert_bias_nodes()
        self._insert_own_shapes()
        self._insert_narrowed()
        remove_initializers(self.model.graph, orphans - read_names(self.model.graph))
        drop_dead_nodes(self.model)
        return changed

    def _insert_bias_nodes(self) -> None:
        graph = self.model.graph
        for producer, bias in self.bias_nodes:
            original = producer.output[0]
            inner = self._fresh_name(f"{original}{SUFFIX}_nobias")
            const = self._fresh_name(f"{original}{SUFFIX}_bias")
            graph.initializer.append(numpy_helper.from_array(bias, const))
            producer.output[0] = inner
            add = helper.make_node("Add", [inner, const], [original], name=self._fresh_name(f"{producer.name or original}{SUFFIX}_bias_add"))
            self._insert_beside(producer, [add], after=True)

    def _insert_own_shapes(self) -> None:
        for reshape, holders in self.own_shapes.values():
            added = self._copied_chain(reshape, {key: inputs for key, (_, inputs) in holders.items()})
            if any(value.dtype != np.int64 for _, inputs in holders.values() for value in inputs.values()):
                cast = helper.make_node("Cast", [added[-1].output[0]], [self._fresh_name(f"{added[-1].output[0]}_int64")],
                                        name=self._fresh_name(f"{added[-1].name}_cast"), to=onnx.TensorProto.INT64)
                added.append(cast)  # tf2onnx: int32 shape arithmetic, cast at the end
            reshape.input[1] = added[-1].output[0]  # the target / shape input of Reshape and Expand
            self._insert_beside(reshape, added)

    def _insert_narrowed(self) -> None:
        graph = self.model.graph
        for node, slot, axis in self.narrowed.values():
            source = node.input[slot]
            narrow = self._fresh_name(f"{source}{SUFFIX}_one")
            name = self._fresh_name(f"{node.name or node.output[0]}{SUFFIX}_narrow{slot}")
            if _opset(self.model) >= 10:
                bounds = [self._fresh_name(f"{narrow}_{part}") for part in ("starts", "ends", "axes")]
                graph.initializer.extend(numpy_helper.from_array(np.array([v], dtype=np.int64), b) for v, b in zip((0, 1, axis), bounds, strict=True))
                added = helper.make_node("Slice", [source, *bounds], [narrow], name=name)
            else:
                added = helper.make_node("Slice", [source], [narrow], name=name, starts=[0], ends=[1], axes=[axis])
            node.input[slot] = narrow
            self._insert_beside(node, [added])

    def _insert_beside(self, anchor: onnx.NodeProto, added: list[onnx.NodeProto], after: bool = False) -> None:
        """Insert `added` (in order) just before `anchor` in the graph, or just after it."""
        nodes = self.model.graph.node
        position = next(i for i, n in enumerate(nodes) if n is anchor) + int(after)
        for node in reversed(added):
            nodes.insert(position, node)

    def _copied_chain(self, reshape: onnx.NodeProto, edits: dict[int, dict[int, np.ndarray]]) -> list[onnx.NodeProto]:
        """Copies of the nodes from `reshape`'s target Concat down to the edited holders (node id
        -> {input slot: new value}), in graph order, reading each other and the new constants;
        the Concat's copy comes last. The original chain stays for its other readers."""
        copies: dict[str, str] = {}  # original outputs -> their copies'
        added = []
        for node in shape_chain(self.index, reshape, set(edits)):
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = self._fresh_name(f"{node.name or node.output[0]}{SUFFIX}")
            for slot, name in enumerate(node.input):
                if name in copies:
                    clone.input[slot] = copies[name]
            for slot, value in edits.get(id(node), {}).items():
                clone.input[slot] = self._fresh_name(f"{node.input[slot]}{SUFFIX}")
                self.model.graph.initializer.append(numpy_helper.from_array(value, clone.input[slot]))
            del clone.output[:]
            for name in node.output:
                copies[name] = self._fresh_name(f"{name}{SUFFIX}") if name else ""
                clone.output.append(copies[name])
            added.append(clone)
        return added

    def _fresh_name(self, base: str) -> str:
        """A name no tensor or node of the graph has, nor any name given before (placed in the
        graph or not yet): every new name comes from here, so the set is built once per rewrite
        (a whole-graph scan per name made a model's rewrite quadratic in its fresh names)."""
        if self._taken is None:
            self._taken = {t.name for t in self.model.graph.initializer} | {t.name for t in self.source}
            self._taken.update(o for n in self.model.graph.node for o in n.output)
            self._taken.update(n.name for n in self.model.graph.node)
        return unique_name(base, self._taken)  # which adds the name to the set


def removed_slots(spaces: list[tuple[Space, SpacePlan]]) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, int]]:
    """Per tensor: removed unit slots (from every space on it), width in slots, elements per slot."""
    removed: dict[str, set[int]] = {}
    widths: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for space, plan in spaces:
        for tensor, placement in space.tensors.items():
            removed.setdefault(tensor, set()).update(placement.positions_of(plan.prune).tolist())
            widths[tensor], blocks[tensor] = placement.width, placement.block
    return {t: np.array(sorted(p), dtype=np.int64) for t, p in removed.items()}, widths, blocks


class Rewriter(FoldMixin):
    """Applies a Plan to a copy of the model.

    Every edit is derived from the removed positions of one tensor's unit axis (DESIGN §3):
    folds first on full-size weights, then all deletions, shape and attribute updates.
    """

    def __init__(self, model: onnx.ModelProto, analysis: Analysis, plan: Plan, recoveries: dict[tuple[int, str], Recovery] | None,
                 constants: Constants | None = None, keep_on_disk: bool = False, fold_cache: dict | None = None,
                 only: set[str] | None = None):
        # the copy gets its initializers at commit: a weight replaced in place would leave its old
        # bytes in the protobuf arena
        self.model = copy_model(model, skip_graph=("initializer",))
        self.source = list(model.graph.initializer)
        self.analysis = analysis
        self.plan = plan
        self.recoveries = recoveries or {}
        # the values the analysis already converted and folded (read only: edits copy)
        self.index = GraphIndex(self.model, shapes={}, initializers=self.source, constants=constants)
        self.edits = ConstantEdits(self.model, self.index, self.source, keep_on_disk)
        self.refresh_shapes = not keep_on_disk  # a working copy (the sequential pass) needs no value_info
        # folds already computed by an earlier rewrite with the same recoveries (the sequential
        # pass rewrites once per segment; each recovery is fixed once fitted)
        self.fold_cache = fold_cache
        self.only = None if only is None else self._with_bias_targets(only)  # node labels to rewrite (a partial working copy)
        self.biases: dict[tuple[str, int], str] = {}  # bias inputs the folds touched -> output tensor

    def run(self) -> onnx.ModelProto:
        spaces = pruned_spaces(self.analysis, self.plan)
        if not spaces and not self.recoveries:
            self.model.graph.initializer.extend(self.edits.keep(t) for t in self.source)
            return self.model
        removed, widths, blocks = removed_slots(spaces)
        elements = {t: expand_blocks(r, blocks[t]) for t, r in removed.items()}
        for space in self.analysis.prunable:  # 1. least-squares folds on full-size weights (sequential
            for consumer in space.consumers:  # corrections also reach spaces that lost no unit)
                recovery = self.recoveries.get((space.id, consumer.site))
                if recovery is not None and (len(recovery.prune) or recovery.changes_kept) and self._wanted(consumer.node):
                    self._fold(consumer, space.tensors[consumer.site].size, recovery)
        for space, _ in spaces:  # a recurrent op's own hidden units: per direction into R and Rb
            for read in space.recurrent_reads:
                if self._wanted(read.node):
                    self._fold_states(space, read)
        # a shared shape Concat's per-Reshape copy goes with its Reshape/Expand (`via`): the
        # Concat itself may lie in an earlier segment, its output cached with the old count
        records = [r for space, _ in spaces
                   for r in [*space.slices, *space.consumers, *space.attrs, *space.reshapes, *space.windows, *space.indices, *space.broadcasts]
                   if self._wanted(getattr(r, "via", "") or r.node)]
        sliced = set()
        for record in dict.fromkeys(records):  # 2. deletions and updates, once per record
            if isinstance(record, ParamSlice):
                sliced.add((record.node, record.input_index))
                self._delete(record.node, record.input_index, record.axis, elements.get(record.tensor), record.repeats)
            elif isinstance(record, Consumer):
                self._delete(record.node, record.weight_index, record.in_axis, expand_blocks(elements[record.site], record.block))
            elif isinstance(record, AttrUpdate):
                self._set_int_attr(record.node, record.attribute, widths[record.tensor] - len(removed[record.tensor]))
            elif isinstance(record, ShapeUpdate):
                value = -1 if record.infer else (widths[record.tensor] - len(removed[record.tensor])) * record.block
                if record.via:
                    self.edits.own_shape(self.index.node(record.via), self.index.node(record.node), record.input_index, record.position, value,
                                         record.dtype)
                    continue
                current = self.edits.get(record.node, record.input_index)  # None: a computed one-entry input (nested Concat)
                target = np.zeros(1, dtype=record.dtype) if current is None else current.copy()
                if record.position < 0:
                    target[()] = value
                else:
                    target[record.position] = value
                self.edits.set(record.node, record.input_index, target)
            elif isinstance(record, IndexUpdate):
                self._renumber(record, removed[record.tensor])
            elif isinstance(record, BroadcastUpdate):
                self.edits.narrow(record.node, record.input_index, record.axis)
            else:
                self._shrink_windows(record, removed[record.tensor], blocks[record.tensor])
        for (label, slot), tensor in self.biases.items():  # biases that were created or broadcast by a fold
            if (label, slot) not in sliced and tensor in removed:
                value = self.edits.get(label, slot)
                if value.shape and value.shape[-1] == widths[tensor] * blocks[tensor]:
                    self.edits.set(label, slot, np.delete(value, elements[tensor], axis=value.ndim - 1))
        self.edits.bias_nodes = [
            (node, np.delete(bias, elements[node.output[0]]) if node.output[0] in elements else bias) for node, bias in self.edits.bias_nodes
        ]
        for name, (axis, removed_elements) in cache_io_changes(self.analysis, self.plan).items():
            for value in [*self.model.graph.input, *self.model.graph.output]:
                if value.name == name:
                    dim = value.type.tensor_type.shape.dim[axis]
                    size = dim.dim_value
                    dim.Clear()
                    dim.dim_value = size - len(removed_elements)
        changed = self.edits.commit()
        touched = {t for s, _ in spaces for t in [*s.tensors, *s.flattened]}
        if self.refresh_shapes:
            _refresh_value_info(self.model, changed | touched)
        else:  # a working copy: stale shapes would stop onnxruntime, fresh ones are not needed
            _drop_value_info(self.model, changed | touched)
        return self.model

    def _wanted(self, label: str) -> bool:
        """Whether the node is rewritten (all, or the `only` nodes of a partial working copy)."""
        return self.only is None or label in self.only

    def _delete(self, label: str, slot: int, axis: int, positions: np.ndarray | None, repeats: int = 1) -> None:
        """Delete `positions` on `axis` of the constant at `slot` (in each of its `repeats` blocks);
        an optional input left empty has nothing to delete."""
        if positions is None or not len(positions) or not self.edits.has(label, slot):
            return
        value = self.edits.get(label, slot)
        if repeats > 1:
            block = value.shape[axis] // repeats
            positions = (positions[None, :] + block * np.arange(repeats)[:, None]).ravel()
        self.edits.set(label, slot, np.delete(value, positions, axis=axis))

    def _set_int_attr(self, label: str, name: str, value: int) -> None:
        for attr in self.index.node(label).attribute:
            if attr.name == name:
                attr.i = value

    def _shrink_windows(self, update: WindowUpdate, removed: np.ndarray, block: int = 1) -> None:
        """Split sizes / Slice bounds after the removal (windows are in unit slots of `block` elements)."""
        node = self.index.node(update.node)
        shrunk = [((a - removed_count(removed, 0, a)) * block, (b - removed_count(removed, 0, b)) * block) for a, b in update.windows]
        if node.op_type == "Slice":
            (start, stop), = shrunk
            rank = self.index.rank(node.input[0]) if self.index.shape(node.input[0]) else None
            axes = self.edits.get(update.node, 3).tolist() if len(node.input) > 3 and node.input[3] else None
            k = self._slice_axis_slot(node, axes, rank)
            for slot, value in ((1, start), (2, stop)):
                array = self.edits.get(update.node, slot)
                if array is None:  # computed from the axis size (TorchScript's chunk): becomes a constant
                    array = np.array(update.bounds[slot - 1], dtype=update.bounds_dtype)
                array = array.copy()
                array[k] = value
                self.edits.set(update.node, slot, array)
            return
        sizes = np.array([b - a for a, b in shrunk], dtype=np.int64)
        if len(node.input) > 1 and node.input[1]:
            self.edits.set(update.node, 1, sizes)
        elif get_attr(node, "split") is not None or _opset(self.model) < 13:
            _replace_attr(node, helper.make_attribute("split", sizes.tolist()))
        else:
            kept = [a for a in node.attribute if a.name != "num_outputs"]
            del node.attribute[:]
            node.attribute.extend(kept)
            self.edits.set(update.node, 1, sizes)

    def _renumber(self, update: IndexUpdate, removed: np.ndarray) -> None:
        """A permuting Gather's indices without the removed positions, renumbered to the kept ones;
        a repeating Gather's renumbered only (the entries of removed units go with the space on its output)."""
        picks = self.edits.get(update.node, 1)
        if update.repeats:
            values = picks.astype(np.int64)
            self.edits.set(update.node, 1, (values - np.searchsorted(removed, values)).astype(picks.dtype))
            return
        size = len(picks)
        normal = picks.astype(np.int64) % size
        kept = normal[~np.isin(normal, removed)]
        self.edits.set(update.node, 1, (kept - np.searchsorted(removed, kept)).astype(picks.dtype))

    def _slice_axis_slot(self, node: onnx.NodeProto, axes: list[int] | None, rank: int | None) -> int:
        """Index, within Slice's starts/ends, of the entry for the unit axis."""
        space_axis = next(s.tensors[node.input[0]].axis for s in self.analysis.prunable if node.input[0] in s.tensors)
        if axes is None:
            return space_axis
        rank = rank if rank is not None else max(space_axis + 1, max(abs(a) for a in axes))
        return [a % rank for a in axes].index(space_axis)

def cache_io_changes(analysis: Analysis, plan: Plan) -> dict[str, tuple[int, np.ndarray]]:
    """Graph inputs/outputs (KV caches) whose unit axis shrinks: name -> (axis, removed elements)."""
    changes = {}
    for space, space_plan in pruned_spaces(analysis, plan):
        for io in space.cache_io:
            placement = space.tensors[io.tensor]
            changes[io.tensor] = (placement.axis, placement.element_positions_of(space_plan.prune))
    return changes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _replace_attr(node: onnx.NodeProto, attribute: onnx.AttributeProto) -> None:
    kept = [a for a in node.attribute if a.name != attribute.name]
    del node.attribute[:]
    node.attribute.extend([*kept, attribute])


def _drop_value_info(model: onnx.ModelProto, changed: set[str]) -> None:
    keep = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def _refresh_value_info(model: onnx.ModelProto, changed: set[str]) -> None:
    """Drop stale value_info of re-shaped tensors, then re-infer the ones the model listed."""
    stale = [v.name for v in model.graph.value_info if v.name in changed]
    if not stale:
        return
    _drop_value_info(model, changed)
    try:  # on the weightless skeleton: inference needs the weights' shapes only
        inferred = onnx.shape_inference.infer_shapes(weightless_skeleton(model, {}))
    except Exception:  # noqa: BLE001 - the checker reports real problems later
        return
    fresh = {v.name: v for v in inferred.graph.value_info}
    model.graph.value_info.extend(fresh[name] for name in stale if name in fresh)


def rewrite(
    model: onnx.ModelProto,
    analysis: Analysis,
    plan: Plan,
    recoveries: dict[tuple[int, str], Recovery] | None,
    constants: Constants | None = None,
    keep_on_disk: bool = False,
    fold_cache: dict | None = None,
    only: set[str] | None = None,
) -> onnx.ModelProto:
    """A pruned copy of `model`; the input is not modified. No recovery when `recoveries` is None.
    `constants`: the model's already converted constants (a GraphIndex's), to avoid a second copy.
    `keep_on_disk`: a working copy: untouched on-disk weights stay references to their files (not
    read) and value_info is not refreshed. `fold_cache`: folds kept between rewrites whose
    recoveries do not change (keyed by consumer and recovery object). `only`: rewrite just these
    nodes (labels), for a working copy of which only they are used (a sequential segment)."""
    return Rewriter(model, analysis, plan, recoveries, constants, keep_on_disk, fold_cache, only).run()
