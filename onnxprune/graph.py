"""A read-only index over an ONNX graph: producers, consumers, constants and shapes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Use:
    """One input slot of one node that reads a tensor."""

    node: onnx.NodeProto
    index: int


def node_label(node: onnx.NodeProto, position: int) -> str:
    """The node's name, or a stable stand-in when the exporter left it empty."""
    return node.name or f"{node.op_type}_{position}"


def get_attr(node: onnx.NodeProto, name: str, default=None):
    """Value of a node attribute, or `default` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class GraphIndex:
    """Maps every tensor of the main graph to its producer, consumers, value and shape."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None):
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.labels: dict[int, str] = {}
        seen: set[str] = set()
        for position, node in enumerate(self.nodes):
            label = node_label(node, position)
            if label in seen:  # duplicate names in the file: keep labels unique
                label = f"{label}#{position}"
            seen.add(label)
            self.labels[id(node)] = label
        self.by_label: dict[str, onnx.NodeProto] = {self.labels[id(n)]: n for n in self.nodes}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: dict[str, list[Use]] = defaultdict(list)
        self.constants: dict[str, np.ndarray] = {}
        self.initializer_names = {t.name for t in graph.initializer}
        for init in graph.initializer:
            self.constants[init.name] = numpy_helper.to_array(init)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.uses[name].append(Use(node, i))
            if node.op_type == "Constant" and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializer_names]
        self.graph_outputs = [o.name for o in graph.output]
        self.shapes: dict[str, Shape] = shapes if shapes is not None else infer_shapes(model)
        for name, value in self.constants.items():
            self.shapes.setdefault(name, tuple(int(d) for d in value.shape))

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[id(node)]

    def node(self, label: str) -> onnx.NodeProto:
        return self.by_label[label]

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _dims(type_proto: onnx.TypeProto) -> Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim
    )


def infer_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Static shapes of every tensor onnx can infer (unknown dims are None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; analysis pins what it cannot see
        inferred = model
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    return shapes


def fix_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of the model whose graph inputs have the given static shapes (for cost counting)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name], strict=False):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed
