"""Graph segments for the sequential fit: cut the node order where few activations are live,
so that each segment runs once on the cached activations at its first cut (DESIGN §2,
sequential recovery) instead of the whole model running once per layer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .graph import Shape, copy_model, node_reads, subgraphs

UNKNOWN_SIZE = 1 << 40  # a tensor of unknown shape is never a cheap place to cut


@dataclass
class GraphSegment:
    """Nodes (start, stop] of the original's node order, the sites produced there, the
    activations live at the cut after `stop` (what the next segment reads) and those live right
    after the sites are produced (where the pruned segment resumes once its sites are refitted)."""

    start: int
    stop: int
    sites: list[str]
    boundary: list[str]
    at_sites: list[str] = field(default_factory=list)


def static_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and what is computed from them alone: every segment recomputes these."""
    static = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        reads = node_reads(node)
        if all(name in static for name in reads) and node.op_type not in ("RandomNormal", "RandomUniform", "Multinomial"):
            static.update(o for o in node.output if o)
    return static


def _size(shape: Shape | None) -> int:
    if shape is None or any(d is None for d in shape):
        return UNKNOWN_SIZE
    return int(np.prod(shape, dtype=np.int64))


def lifetimes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """(node position producing each activation, position of its last reader); constants and
    what is computed from them alone are left out (every segment recomputes them)."""
    static = static_tensors(model)
    produced: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for position, node in enumerate(model.graph.node):
        for name in node_reads(node):
            last_use[name] = position
        for name in node.output:
            if name and name not in static:
                produced[name] = position
    return produced, last_use


def cut_segments(model: onnx.ModelProto, sites: Iterable[str], shapes: dict[str, Shape]) -> list[GraphSegment]:
    """One segment per group of sites produced by the same node, in node order; each cut lies
    between two groups where the activations live across it are smallest (the earliest such)."""
    nodes = list(model.graph.node)
    inputs = {i.name for i in model.graph.input}
    produced, last_use = lifetimes(model)
    wanted = set(sites)
    missing = wanted - produced.keys()
    if missing:
        raise ValueError(f"sites not produced by any node: {sorted(missing)}")
    live_change = np.zeros(len(nodes) + 1, dtype=np.int64)  # live at cut i: produced <= i < last use
    for name, position in produced.items():
        end = last_use.get(name, position)
        if end > position and name not in inputs:
            size = _size(shapes.get(name))
            live_change[position] += size
            live_change[end] -= size
    live = np.cumsum(live_change)[:-1]
    groups: dict[int, list[str]] = {}
    for name in sorted(wanted, key=lambda t: produced[t]):
        groups.setdefault(produced[name], []).append(name)
    positions = sorted(groups)

    def live_at(cut: int) -> list[str]:
        return sorted(name for name, p in produced.items() if p <= cut < last_use.get(name, p) and name not in inputs)

    segments, start = [], -1
    for j, position in enumerate(positions):
        if j + 1 == len(positions):
            segments.append(GraphSegment(start, position, groups[position], [], live_at(position)))
            break
        window = live[position:positions[j + 1]]
        cut = position + int(np.argmin(window))
        segments.append(GraphSegment(start, cut, groups[position], live_at(cut), live_at(position)))
        start = cut
    return segments


def needed_nodes(model: onnx.ModelProto, available: Iterable[str], outputs: list[str]) -> tuple[set[int], set[str]]:
    """(positions of the nodes that compute `outputs` from the `available` tensors, the graph
    inputs and the initializers; the available tensors they read)."""
    graph = model.graph
    available = set(available)
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    sources = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    needed: set[int] = set()
    fed: set[str] = set()
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        if name in available:
            fed.add(name)
        elif name in sources:
            continue
        elif name in producer:
            position = producer[name]
            if position not in needed:
                needed.add(position)
                stack.extend(node_reads(graph.node[position]))
        else:
            raise ValueError(f"tensor '{name}' is not produced by the model")
    return needed, fed


def extract(model: onnx.ModelProto, available: dict[str, np.dtype], outputs: list[str]) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` from the `available` activations (fed as
    inputs with these dtypes), the graph inputs and the initializers; a tensor that is neither
    is recomputed from earlier nodes."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input}
    needed, fed = needed_nodes(model, available, outputs)
    part = copy_model(model, skip_graph=("node", "initializer", "input", "output", "value_info"))
    part.graph.node.extend(graph.node[i] for i in sorted(needed))
    used = {name for i in needed for name in node_reads(graph.node[i])} | set(outputs)
    part.graph.initializer.extend(t for name, t in initializers.items() if name in used and name not in available)
    part.graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(available[name])), None)
                            for name in sorted(fed))
    part.graph.input.extend(value for name, value in graph_inputs.items() if name in used and name not in available and name not in initializers)
    part.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    return part


def prefix_names(graph: onnx.GraphProto, prefix: str) -> None:
    """Every tensor and node name of `graph` and its subgraphs gets `prefix`, in place (names a
    subgraph reads from the enclosing scope are renamed alike, so they still match)."""

    def renamed(names: Iterable[str]) -> list[str]:
        return [prefix + name if name else name for name in names]

    for node in graph.node:
        inputs, outputs = renamed(node.input), renamed(node.output)
        del node.input[:], node.output[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
        if node.name:
            node.name = prefix + node.name
        for inner in subgraphs(node):
            prefix_names(inner, prefix)
    for tensor in graph.initializer:
        tensor.name = prefix + tensor.name
    for sparse in graph.sparse_initializer:
        sparse.values.name = prefix + sparse.values.name
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = prefix + value.name
    for annotation in graph.quantization_annotation:
        annotation.tensor_name = prefix + annotation.tensor_name


def side_by_side(first: onnx.ModelProto, second: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """One model that computes both parts (of the same model, so the same opsets): `first` as it
    is and `second` with its names prefixed. Both arguments are consumed (changed in place)."""
    prefix_names(second.graph, prefix)
    for field_name in ("node", "initializer", "sparse_initializer", "input", "output", "value_info"):
        getattr(first.graph, field_name).extend(getattr(second.graph, field_name))
    versions = {(o.domain or ""): o for o in first.opset_import}
    for opset in second.opset_import:
        current = versions.get(opset.domain or "")
        if current is None:
            first.opset_import.append(opset)
        elif opset.version > current.version:
            current.version = opset.version
    known = {(f.domain, f.name) for f in first.functions}
    first.functions.extend(f for f in second.functions if (f.domain, f.name) not in known)
    return first
