"""Fused projections cut into parts, written as one projection per part when the analysis
would pin them: grouped-query attention with one QKV projection (Phi-3-medium's and
Phi-4-mini's `qkv_proj`) writes the query, key and value heads side by side, and Slices cut
them apart. Its one space would hold query heads (planned) and key and value heads (each
derived from a repeat_kv Gather: two derivations, and a space is either derived or planned),
so it was pinned. One MatMul per part makes each part a space of its own, as with Llama's
q/k/v projections; the written model keeps the parts (docs/design.md, "One fused QKV
projection with grouped-query attention"). Falcon's `query_key_value` interleaves the parts by
KV group instead ([..., groups, members, head], cut on the members axis): `interleaved.py`."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .analyse import Analysis, analyse
from .graph import GraphIndex, drop_dead_nodes, get_attr, read_names, remove_initializers, unique_name
from .interleaved import Part, interleaved_parts
from .rules.slicing import cut_windows
from .tidy import FP16_WEIGHTS


@dataclass(frozen=True)
class Fused:
    """A MatMul or Gemm with a constant weight (and a bias Add) whose output only `cuts` read
    (with the Reshapes around them that the parts replace), each part writing some of its columns."""

    node: onnx.NodeProto
    bias: onnx.NodeProto | None
    cuts: tuple[onnx.NodeProto, ...]
    parts: tuple[Part, ...]


def analyse_unfused(model: onnx.ModelProto, exclude: list[str] | tuple[str, ...] | None, index: GraphIndex) -> tuple[GraphIndex, Analysis]:
    """The analysis of the loaded copy, and its index; a fused projection whose space mixes
    derived units with others (pinned) is first written as one projection per part (in place),
    and the model analysed again. Excluded projections stay as they are."""
    exclude = list(exclude or [])
    analysis = analyse(model, exclude, index=index)
    found = [fused for space in analysis.spaces if space.pinned and space.derived is not None for label in space.producers
             if not any(fnmatch.fnmatchcase(label, pattern) for pattern in exclude) and (fused := fused_projection(index, index.node(label)))]
    if not found:
        return index, analysis
    index = unfuse_projections(model, index, list({id(fused.node): fused for fused in found}.values()))
    return index, analyse(model, exclude, index=index)


def unfuse_projections(model: onnx.ModelProto, index: GraphIndex, found: list[Fused]) -> GraphIndex:
    """Write each fused projection as one projection per part (`unfuse`), in place; the index
    of the changed model (the same shapes, and the new tensors')."""
    added = {id(fused.node): unfuse(model, index, fused) for fused in found}
    replaced = [n for fused in found for n in (fused.node, fused.bias, *fused.cuts) if n is not None]
    gone = {id(n) for n in replaced}
    nodes = [new for node in index.nodes for new in [*added.get(id(node), []), *([] if id(node) in gone else [node])]]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_dead_nodes(model)  # the cuts' bound constants
    remove_initializers(model.graph, {name for node in replaced for name in node.input} - read_names(model.graph, inputs=True))  # the fused weight, bias and bounds
    return GraphIndex(model, index.shapes)


def fused_projection(index: GraphIndex, node: onnx.NodeProto) -> Fused | None:
    """The parts of a MatMul/Gemm with a constant 2-D weight, through an optional Add of a
    constant bias of its width, whose output only Slices and Splits on its last axis with
    constant bounds read, in disjoint windows, or whose output Reshapes view as [..., groups,
    members, head] cut on the members axis (`interleaved_parts`); None for any other node."""
    width = _output_width(index, node)
    if width is None:
        return None
    bias, cut = None, node.output[0]
    uses = index.uses.get(cut, [])
    if len(uses) == 1 and uses[0].node.op_type == "Add" and cut not in index.graph_outputs:
        other = uses[0].node.input[1 - uses[0].index]
        value = index.const(other)
        if value is None or value.shape != (width,):
            return None
        bias, cut = uses[0].node, uses[0].node.output[0]
    found = _last_axis_parts(index, cut, width)
    if found is None:
        leading = node.input[0] if node.op_type == "MatMul" or not get_attr(node, "transA", 0) else None  # same leading axes as the output
        found = interleaved_parts(index, cut, width, tuple(s for s in (leading, node.output[0] if bias else None) if s))
    return None if found is None else Fused(node, bias, tuple(found[0]), tuple(found[1]))


def _last_axis_parts(index: GraphIndex, cut: str, width: int) -> tuple[list[onnx.NodeProto], list[Part]] | None:
    """The readers of `cut` and its parts when only Slices and Splits of its last axis with
    constant bounds read it, in disjoint windows; None otherwise."""
    rank = index.rank(cut)
    cuts = [use.node for use in index.uses.get(cut, [])]
    if rank is None or not cuts or cut in index.graph_outputs or any(use.index != 0 for use in index.uses[cut]):
        return None
    parts: list[tuple[str, int, int]] = []
    for reader in cuts:
        windows = cut_windows(index, reader, rank, width, rank - 1)
        if windows is None:
            return None
        parts += windows
    spans = sorted((start, stop) for _, start, stop in parts)
    if any(stop <= start for start, stop in spans) or any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        return None
    return cuts, [Part(np.arange(start, stop), ((out, None),)) for out, start, stop in parts]


def _output_width(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """The width of a MatMul's or plain Gemm's constant 2-D weight (its output's last axis)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    if node.input[1] not in index.initializer_names or len(dims := index.const_dims(node.input[1])) != 2:
        return None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = index.shape(node.input[2])
        if not index.is_constant(node.input[2]) or c is None or len(c) > 2 or any(d != 1 for d in c[:-1]):
            return None
    return dims[0] if node.op_type == "Gemm" and get_attr(node, "transB", 0) else dims[1]


def unfuse(model: onnx.ModelProto, index: GraphIndex, fused: Fused) -> list[onnx.NodeProto]:
    """The nodes that replace the projection, its bias Add, its cuts and the Reshapes around them:
    one projection (and Add) per part, with its weight's columns and its bias's entries (new
    initializers), writing the part's tensor itself or Reshapes of it to its views (the shapes of
    `index` learn the new tensors); fp16-stored weights stay so (`tidy.FP16_WEIGHTS`)."""
    graph, node = model.graph, fused.node
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    created: dict[str, list[str]] = {}
    added: list[onnx.NodeProto] = []
    for k, part in enumerate(fused.parts):
        direct = part.views[0][0] if len(part.views) == 1 and part.views[0][1] is None else None
        out = direct or unique_name(f"{node.output[0]}_part{k}", taken)
        if not direct:  # the fused (or biased) output's leading axes, and the part's columns
            index.shapes[out] = (*index.shape((fused.bias or node).output[0])[:-1], len(part.columns))
        added += _projection_part(graph, index, fused, k, part.columns, out, taken, created)
        for tensor, target in ([] if direct else part.views):
            shape = _add_weight(graph, np.array(target, dtype=np.int64), f"{node.output[0]}_shape", k, taken, {})
            added.append(onnx.helper.make_node("Reshape", [out, shape], [tensor], name=unique_name(f"{index.label(node)}_part{k}_view", taken)))
    _keep_fp16(model, created)
    return added


def _projection_part(graph: onnx.GraphProto, index: GraphIndex, fused: Fused, k: int, columns: np.ndarray, out: str, taken: set[str],
                     created: dict[str, list[str]]) -> list[onnx.NodeProto]:
    """The projection (and bias Add) of part `k`, its weight's `columns` (and its bias's entries),
    writing `out`."""
    node = fused.node
    weight = index.const(node.input[1])
    transposed = node.op_type == "Gemm" and get_attr(node, "transB", 0)  # the weight holds a row per output
    c = index.const(node.input[2]) if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    part = onnx.NodeProto()
    part.CopyFrom(node)
    part.name = unique_name(f"{index.label(node)}_part{k}", taken)
    part.input[1] = _add_weight(graph, weight[columns] if transposed else weight[:, columns], node.input[1], k, taken, created)
    if c is not None and c.shape and c.shape[-1] != 1:
        part.input[2] = _add_weight(graph, c[..., columns], node.input[2], k, taken, created)
    if fused.bias is None:
        part.output[0] = out
        return [part]
    part.output[0] = unique_name(f"{node.output[0]}_part{k}", taken)
    index.shapes[part.output[0]] = index.shapes.get(out)
    bias = next(n for n in fused.bias.input if index.is_constant(n))
    add = onnx.NodeProto()
    add.CopyFrom(fused.bias)
    add.name = unique_name(f"{index.label(fused.bias)}_part{k}", taken)
    slot = list(add.input).index(bias)
    add.input[slot] = _add_weight(graph, index.const(bias)[columns], bias, k, taken, created)
    add.input[1 - slot] = part.output[0]
    add.output[0] = out
    return [part, add]


def _add_weight(graph: onnx.GraphProto, value: np.ndarray, source: str, part: int, taken: set[str], created: dict[str, list[str]]) -> str:
    """A new initializer holding a part of `source`; its name."""
    name = unique_name(f"{source}_part{part}", taken)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    created.setdefault(source, []).append(name)
    return name


def _keep_fp16(model: onnx.ModelProto, created: dict[str, list[str]]) -> None:
    """The parts of a weight the model stores as fp16 + Cast are stored so too."""
    entry = next((e for e in model.metadata_props if e.key == FP16_WEIGHTS), None)
    if entry is None:
        return
    names = json.loads(entry.value)
    names += [part for source in names if source in created for part in created[source]]
    entry.value = json.dumps(names)
