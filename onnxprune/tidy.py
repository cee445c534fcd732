"""Clean-ups of the loaded copy before the analysis, so that every linear layer's weight is a
constant of its own: exporters share one initializer between equal parameters (TorchScript's
Identity) and compute some weights from others (nn.MultiheadAttention's cross-attention splits
and transposes its packed in_proj_weight at run time)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from .graph import FOLD_LIMIT, node_reads
from .tensors import tensor_size

# Ops that only move a weight's values around: folding them never changes a number or a dtype
# (Cast, which would widen an fp16 weight, and DequantizeLinear stay).
MOVES = frozenset({"Transpose", "Split", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Flatten"})


def tidy(model: onnx.ModelProto) -> None:
    """Untie shared weights, then fold weights computed by value-moving ops (in place)."""
    untie_identities(model)
    fold_moved_weights(model)


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


def fold_moved_weights(model: onnx.ModelProto) -> None:
    """Replace a value-moving node whose inputs are in-memory initializers read by nothing else
    (and whose outputs are not graph outputs) with initializers of its outputs: no weight is
    duplicated, and the layers reading them get constant weights (their units become prunable)."""
    graph = model.graph
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node_reads(node):
            readers[name] = readers.get(name, 0) + 1
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}  # an initializer declared an input can be fed
    folded: set[int] = set()
    for position, node in enumerate(graph.node):
        inputs = [name for name in node.input if name]
        sources = [initializers.get(name) for name in inputs]
        if (node.op_type not in MOVES or node.domain not in ("", "ai.onnx") or not inputs or any(o in outputs for o in node.output)
                or any(s is None or uses_external_data(s) for s in sources)
                or any(readers[name] != 1 and tensor_size(initializers[name]) > FOLD_LIMIT for name in set(inputs))):
            continue  # a large input read elsewhere too would be duplicated; small ones (split sizes) are shared
        values = _evaluate(node, {name: numpy_helper.to_array(initializers[name]) for name in set(inputs)}, model)
        if values is None:
            continue
        for name in set(inputs):
            readers[name] -= 1
            if not readers[name]:
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


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], model: onnx.ModelProto) -> list[np.ndarray] | None:
    """The node's outputs on constant inputs (onnx's reference evaluator), or None."""
    from onnx.reference import ReferenceEvaluator

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    try:
        graph = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in values.items()],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
        )
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)] if opset else None)
        results = ReferenceEvaluator(proto).run(None, values)
    except Exception:  # noqa: BLE001 - folding is a convenience; an unfolded weight pins its layer as before
        return None
    outputs = iter(np.asarray(r) for r in results)
    return [next(outputs) if o else None for o in node.output]
