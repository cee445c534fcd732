"""Clean-ups of the loaded copy before the analysis, so that every linear layer's weight is a
constant of its own: exporters share one initializer between equal parameters (TorchScript's
Identity) and compute some weights from others (nn.MultiheadAttention's packed in_proj_weight,
split and transposed at run time by torch.export, sliced with bounds computed from a shape by
TorchScript: the latter is folded once the static shapes are known, `shapes_and_index`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from .gathers import moves_as_gathers
from .graph import (
    FOLD_LIMIT,
    SUFFIX,
    GraphIndex,
    default_opset,
    drop_dead_nodes,
    evaluate_outputs,
    get_attr,
    node_reads,
    read_names,
    remove_initializers,
    static_shapes,
    unique_name,
)
from .ops import RECURRENT_GATES, STANDARD_DOMAINS
from .tensors import data_bytes, location, read_array, tensor_size

# Ops that only move a weight's values around: folding them never changes a number or a dtype
# (Cast, which would widen an fp16 weight, and DequantizeLinear stay).
MOVES = frozenset({"Transpose", "Split", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Flatten"})


def tidy(model: onnx.ModelProto) -> list[str]:
    """Weights listed as graph inputs become plain weights, fp16 weights cast to float become
    float weights (stored as fp16 again by `restore_fp16_weights`), shared weights are untied,
    weights computed by value-moving ops are folded (in place); notes on what the user will see
    change."""
    notes = initializers_not_inputs(model)
    fold_fp16_weights(model)
    untie_identities(model)
    fold_moved_weights(model)
    add_recurrent_biases(model)
    return notes


def add_recurrent_biases(model: onnx.ModelProto) -> None:
    """Give an LSTM/GRU/RNN without its optional B input an explicit zero B (the same function):
    the hidden units' slices and the recovery's folds then edit one bias of the right size."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {o for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type not in RECURRENT_GATES or node.domain not in STANDARD_DOMAINS or (len(node.input) > 3 and node.input[3]):
            continue
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 3:
            continue
        name = unique_name(f"{node.name or node.output[0]}_B", taken)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
        graph.initializer.append(numpy_helper.from_array(np.zeros((weight.dims[0], 2 * weight.dims[1]), dtype), name))
        while len(node.input) < 4:
            node.input.append("")
        node.input[3] = name


def initializers_not_inputs(model: onnx.ModelProto) -> list[str]:
    """Drop the graph inputs that name initializers (IR version 3 required them; older exporters
    and `keep_initializers_as_inputs=True` still write them): as inputs they are values a caller
    may replace, so nothing could prune them, and onnxruntime does not optimise them either.
    The IR version is raised to 4, the first that allows it."""
    initializers = {t.name for t in model.graph.initializer}
    kept = [value for value in model.graph.input if value.name not in initializers]
    dropped = len(model.graph.input) - len(kept)
    if not dropped:
        return []
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)
    return [f"{dropped} weights the model also listed as graph inputs are plain weights in the pruned model (IR version "
            f"{model.ir_version}); its inputs are {', '.join(repr(v.name) for v in kept)}"]


FP16_WEIGHTS = "onnxprune.fp16_weights"  # metadata of the loaded copy: float weights the model stores as fp16 + Cast
HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def fold_fp16_weights(model: onnx.ModelProto) -> None:
    """Fold Cast(fp16 weight -> float) into a float weight, so that the layers reading it are
    analysed (mixed-precision storage: half the bytes, float arithmetic); their names are kept
    in the metadata, and `restore_fp16_weights` stores the pruned weights as fp16 + Cast again."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    folded = [n for n in graph.node if n.op_type == "Cast" and get_attr(n, "to") == onnx.TensorProto.FLOAT and n.input
              and (source := initializers.get(n.input[0])) is not None and source.data_type in HALF_TYPES
              and readable(source) and n.output[0] not in {o.name for o in graph.output}]
    if not folded:
        return
    for node in folded:  # weights in external files too (optimum's model.onnx_data): their float copies are in memory
        graph.initializer.append(numpy_helper.from_array(read_array(initializers[node.input[0]]).astype(np.float32), node.output[0]))
    kept = [n for n in graph.node if all(n is not f for f in folded)]
    del graph.node[:]
    graph.node.extend(kept)
    remove_initializers(graph, {n.input[0] for n in folded} - read_names(graph))
    entry = model.metadata_props.add()
    entry.key, entry.value = FP16_WEIGHTS, json.dumps([n.output[0] for n in folded])


def readable(tensor: onnx.TensorProto) -> bool:
    """In memory, or on disk at a resolved location (a loaded file's external data is anchored)."""
    return not uses_external_data(tensor) or location(tensor)[0].is_absolute()


def restore_fp16_weights(model: onnx.ModelProto) -> int:
    """Store the weights `fold_fp16_weights` made float (and the rewrite's edited copies of them)
    as fp16 + Cast again, in place; how many. A large model's float copies that wait in the
    pipeline's temporary weights file are read back as fp16 (half their float size in memory)."""
    entry = next((e for e in model.metadata_props if e.key == FP16_WEIGHTS), None)
    if entry is None:
        return 0
    names = set(json.loads(entry.value))
    model.metadata_props.remove(entry)
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    casts, restored = [], 0
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or not (tensor.name in names or tensor.name.split(SUFFIX)[0] in names):
            continue
        half = unique_name(f"{tensor.name}_fp16", taken)
        value = read_array(tensor).astype(np.float16)
        casts.append(onnx.helper.make_node("Cast", [half], [tensor.name], name=half + "_cast", to=onnx.TensorProto.FLOAT))
        tensor.CopyFrom(numpy_helper.from_array(value, half))
        restored += 1
    for cast in reversed(casts):
        graph.node.insert(0, cast)
    return restored


UNTIE_ELEMENTS = 4 << 20  # a larger shared weight (a tied embedding and LM head) is not copied


def untie_identities(model: onnx.ModelProto) -> None:
    """Give every Identity of an in-memory initializer its own copy of the value (TorchScript
    writes one initializer for equal parameters, e.g. layers cloned from one another, and an
    Identity for each other use): each layer can then be pruned on its own. Weights above
    UNTIE_ELEMENTS stay shared (the report names a layer that reads one)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Identity" and node.input else None
        if source is None or uses_external_data(source) or node.output[0] in outputs or tensor_size(source) > UNTIE_ELEMENTS:
            kept.append(node)
            continue
        copy = graph.initializer.add()
        copy.CopyFrom(source)
        copy.name = node.output[0]
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def shapes_and_index(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                     problems: list[str] | None = None) -> tuple[dict, GraphIndex]:
    """The static shapes and the graph index of the loaded copy at `input_shapes`; a weight cut
    by a Slice whose bounds are computed from shapes (TorchScript's nn.MultiheadAttention
    in-projection chunks, `w.chunk(3)`) is folded first, at those shapes, and channel shuffles
    and repeat_kv become Gathers (`onnxprune.gathers`)."""
    shapes = static_shapes(model, input_shapes, problems)
    index = GraphIndex(model, shapes)
    varied = functools.cache(lambda: varied_index(model, input_shapes))  # one more probe, only if a fold asks (sizes survive folds)
    if _fold_shaped_slices(model, index, varied):
        fold_moved_weights(model)  # the Transpose after each folded chunk
        shapes = static_shapes(model, input_shapes)
        index = GraphIndex(model, shapes)
    if moves_as_gathers(model, index, varied):
        drop_dead_nodes(model)  # the replaced nodes and their shape computations
        index = GraphIndex(model, shapes)
    if gathers_from_concat_inputs(model, index, varied):
        drop_dead_nodes(model)  # the Concat nothing reads any more
        index = GraphIndex(model, shapes)
    return shapes, index


def gathers_from_concat_inputs(model: onnx.ModelProto, index: GraphIndex, varied: Callable[[], GraphIndex]) -> bool:
    """Point a Gather of constant indices on a Concat's axis at the one Concat input all its
    indices fall in (`h_n[-1]` of a stacked LSTM: TorchScript concatenates every layer's Y_h,
    and the classifier reads the last layer's): the other inputs are no longer read, so their
    units are not tied to it. Only inputs whose sizes on that axis do not follow the dynamic
    input dims (`varied`) are taken; whether any Gather was changed (in place)."""
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    changed = False
    for node in model.graph.node:
        source = index.producer.get(node.input[0]) if node.op_type == "Gather" and len(node.input) == 2 else None
        indices = index.const(node.input[1]) if source is not None and source.op_type == "Concat" else None
        rank = index.rank(node.input[0]) if indices is not None else None
        if indices is None or rank is None or indices.dtype.kind not in "iu":
            continue
        axis = get_attr(node, "axis", 0) % rank
        if get_attr(source, "axis", 0) % rank != axis:
            continue
        sizes = [(index.shape(i) or [None] * rank)[axis] for i in source.input]
        if None in sizes or sizes != [((varied().shape(i) or [None] * rank)[axis]) for i in source.input]:
            continue
        starts = np.cumsum([0, *sizes])
        flat = np.where(indices < 0, indices + starts[-1], indices)
        j = int(np.searchsorted(starts, flat.min(), side="right")) - 1
        if not (0 <= j < len(sizes) and starts[j] <= flat.min() and flat.max() < starts[j + 1]):
            continue
        name = unique_name(f"{node.input[1]}_of_{source.input[j]}", taken)
        model.graph.initializer.append(numpy_helper.from_array((flat - starts[j]).astype(indices.dtype), name))
        node.input[0], node.input[1] = source.input[j], name
        changed = True
    return changed


def _fold_shaped_slices(model: onnx.ModelProto, index: GraphIndex, varied: Callable[[], GraphIndex]) -> bool:
    """Give Slices of an in-memory initializer whose bounds are computed from sizes constant
    bounds, then fold them; whether any was. Only bounds that stay the same when every dynamic
    input dim changes are taken (a position table cut to the sequence length is left alone;
    `varied` gives the index at larger dynamic input dims)."""
    from .rules.shape_values import static_value

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    slices = []
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Slice" and node.input else None
        computed = {slot: name for slot, name in enumerate(node.input) if slot and name and not index.is_constant(name)}
        if source is not None and not uses_external_data(source) and computed:
            slices.append((node, computed))
    if not slices:
        return False
    other = varied()
    changed = False
    for node, computed in slices:
        values = {slot: static_value(index, name) for slot, name in computed.items()}
        if any(value is None or not np.array_equal(value, static_value(other, computed[slot])) for slot, value in values.items()):
            continue
        for slot, value in values.items():
            fresh = f"{node.output[0]}_bound{slot}"
            graph.initializer.add().CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.int64), fresh))
            node.input[slot] = fresh
            changed = True
    return changed


def varied_index(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> GraphIndex:
    """The graph index at `input_shapes` with every dynamic input dim one larger: a size that
    differs from the one at `input_shapes` depends on the inputs."""
    from .inputs import input_specs

    varied = dict(input_shapes)
    for spec in input_specs(model):
        if spec.name in varied:
            varied[spec.name] = tuple(d if fixed is not None else d + 1 for d, fixed in zip(varied[spec.name], spec.dims, strict=False))
    return GraphIndex(model, static_shapes(model, varied))


MOVED_EXTERNAL_BYTES = 256 << 20  # external-data weights read into memory to fold the nodes that move them, at most


def fold_moved_weights(model: onnx.ModelProto) -> None:
    """Replace value-moving nodes whose inputs are initializers (in memory, or in external files
    up to MOVED_EXTERNAL_BYTES in all) and whose outputs are not graph outputs with initializers
    of their outputs, when a large input is read by no other kind of node (a packed weight cut
    into parts by Slices or a Split): no weight is kept twice, and the layers reading the parts
    get constant weights (their units become prunable)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    small = {n.output[0]: n.attribute[0].t for n in graph.node  # Constant nodes' tensors (TorchScript's slice bounds)
             if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}  # an initializer declared an input can be fed

    def movable(node: onnx.NodeProto) -> bool:
        inputs = [name for name in node.input if name]
        return (node.op_type in MOVES and node.domain in ("", "ai.onnx") and bool(inputs) and not any(o in outputs for o in node.output)
                and all(name in small or name in initializers and readable(initializers[name]) for name in inputs))

    # weights in external files (torch.export writes an LSTM's W and R as slices of its parameters
    # there) come into memory when moved, up to a budget: a big model's are left where they are
    external_budget = MOVED_EXTERNAL_BYTES

    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):
            readers.setdefault(name, []).append(node)
    folded: set[int] = set()
    for position, node in enumerate(graph.node):
        inputs = set(name for name in node.input if name)
        large = [name for name in inputs if name in initializers and tensor_size(initializers[name]) > FOLD_LIMIT]
        if not movable(node) or any(not all(movable(r) for r in readers[name]) for name in large):
            continue  # a large input that another kind of node reads too would be kept twice; small ones (split sizes) are shared
        external = sum(data_bytes(initializers[name]) for name in inputs if name in initializers and uses_external_data(initializers[name]))
        if external > external_budget:
            continue
        external_budget -= external
        values = evaluate_outputs(node, {name: read_array(initializers[name]) if name in initializers else numpy_helper.to_array(small[name])
                                         for name in inputs}, default_opset(model))
        if values is None:
            continue
        for name in inputs:
            readers[name].remove(node)
            if not readers[name] and name in initializers:
                graph.initializer.remove(initializers.pop(name))
        for name, value in zip(node.output, values, strict=True):
            if name:
                initializers[name] = graph.initializer.add()
                initializers[name].CopyFrom(numpy_helper.from_array(value, name))
        folded.add(position)
    if folded:
        kept = [node for position, node in enumerate(graph.node) if position not in folded]
        del graph.node[:]
        graph.node.extend(kept)

