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
        self.constants.update(fold_constants(self.nodes, self.constants))
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


# Small constant subgraphs (shape arithmetic, Resize scales built by Concat) are folded so the
# analysis can read them; weights are never computed this way (size limit).
FOLDABLE = frozenset({
    "Identity", "Cast", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Gather", "Slice", "Add", "Sub",
    "Mul", "Div", "Neg", "Range", "ConstantOfShape", "Expand", "Equal", "Where", "Floor", "Ceil",
})
FOLD_LIMIT = 4096


def fold_constants(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of the outputs of small nodes whose inputs are all constant."""
    from onnx.reference import ReferenceEvaluator

    known = dict(constants)
    folded: dict[str, np.ndarray] = {}
    for node in nodes:
        inputs = [i for i in node.input if i]
        if node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or not inputs or len(node.output) != 1:
            continue
        if not all(i in known for i in inputs) or sum(known[i].size for i in inputs) > FOLD_LIMIT:
            continue
        try:
            graph = onnx.helper.make_graph(
                [node], "fold",
                [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape) for i in dict.fromkeys(inputs)],
                [onnx.helper.make_empty_tensor_value_info(node.output[0])],
            )
            (value,) = ReferenceEvaluator(onnx.helper.make_model(graph)).run(None, {i: known[i] for i in dict.fromkeys(inputs)})
        except Exception:  # noqa: BLE001 - folding is an optimisation; unknown values are pinned later
            continue
        value = np.asarray(value)
        if value.size <= FOLD_LIMIT:
            known[node.output[0]] = folded[node.output[0]] = value
    return folded


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, Shape]:
    """Shapes of every tensor with the inputs fixed and small constant subgraphs folded."""
    fixed = fix_input_shapes(model, input_shapes)
    constants = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    constants.update({n.output[0]: v for n in fixed.graph.node if n.op_type == "Constant" and (v := _constant_node_value(n)) is not None})
    folded = fold_constants(list(fixed.graph.node), constants)
    if folded:
        kept = [n for n in fixed.graph.node if not (n.output and all(o in folded for o in n.output))]
        del fixed.graph.node[:]
        fixed.graph.node.extend(kept)
        fixed.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
    shapes = infer_shapes(fixed)
    missing = [o for n in fixed.graph.node for o in n.output if o and (o not in shapes or None in shapes[o])]
    if missing:
        shapes.update(probe_shapes(fixed, input_shapes, missing))
    return shapes


def probe_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, Shape]:
    """Shapes that static inference missed (computed Slice bounds, Shape subgraphs), read off one
    onnxruntime run on zeros of the fixed input shapes."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {}
    for value in probe.graph.input:
        if value.name in input_shapes:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = np.zeros(input_shapes[value.name], dtype=dtype)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception:  # noqa: BLE001 - best effort: the analysis pins what stays unknown
        return {}
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(names, values, strict=True)}


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
