"""A read-only index over an ONNX graph: producers, consumers, constants and shapes."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .tensors import read_array, tensor_size

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class Use:
    """One input slot of one node that reads a tensor; index -1: read from the enclosing scope
    by one of the node's subgraphs (an If/Loop/Scan body), which no rule can follow."""

    node: onnx.NodeProto
    index: int


IMPLICIT = -1


STANDARD_WITH_SUBGRAPHS = frozenset({"If", "Loop", "Scan", "SequenceMap"})  # the ONNX ops with graph attributes


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """A node's subgraphs (an If's branches, a Loop's or Scan's body)."""
    if node.op_type not in STANDARD_WITH_SUBGRAPHS and node.domain in ("", "ai.onnx"):
        return []  # the common case, without walking the attributes
    return [graph for attr in node.attribute for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)]


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    names: set[str] = set()
    for graph in subgraphs(node):
        inner = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for sub in graph.node:
            names.update(name for name in [*sub.input, *subgraph_reads(sub)] if name and name not in inner)
    return names


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor the node reads: its inputs and what its subgraphs read from the enclosing graph."""
    return [name for name in node.input if name] + sorted(subgraph_reads(node))


def read_names(graph: onnx.GraphProto, inputs: bool = False) -> set[str]:
    """What must stay: the names the nodes (and their subgraphs) read, the graph's outputs, and
    with `inputs` its inputs (a weight declared an input too can be fed)."""
    used = {name for node in graph.node for name in node_reads(node)} | {o.name for o in graph.output}
    return used | {i.name for i in graph.input} if inputs else used


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads any more (a shape Concat replaced by its copy)."""
    graph = model.graph
    while True:
        used = read_names(graph)
        dead = [i for i, n in enumerate(graph.node) if n.output and not any(o in used for o in n.output if o)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]
        remove_initializers(graph, {t.name for t in graph.initializer} - read_names(graph, inputs=True))  # one declared an input too stays (it can be fed)


def remove_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Delete in place: rebuilding the list would copy every remaining weight."""
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in names:
            del graph.initializer[i]


def node_label(node: onnx.NodeProto, position: int) -> str:
    """The node's name, or a stable stand-in when the exporter left it empty."""
    return node.name or f"{node.op_type}_{position}"


def get_attr(node: onnx.NodeProto, name: str, default=None):
    """Value of a node attribute, or `default` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def get_text_attr(node: onnx.NodeProto, name: str, default: str = "") -> str:
    """A string attribute (auto_pad, direction, an Einsum equation) as text: onnx hands it over as bytes."""
    value = get_attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def copy_fields(source, target, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of a protobuf message except `skip` (e.g. a graph without its
    initializers, without copying the weights)."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        if isinstance(value, str | bytes | int | float):
            setattr(target, descriptor.name, value)
        elif hasattr(value, "extend"):
            getattr(target, descriptor.name).extend(value)
        else:
            getattr(target, descriptor.name).CopyFrom(value)


def copy_model(model: onnx.ModelProto, skip_graph: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A copy of the model without the graph fields `skip_graph` (e.g. "initializer": the
    weights are not copied)."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip=("graph",))
    copy_fields(model.graph, copy.graph, skip=skip_graph)
    return copy


class Constants(Mapping):
    """name -> NumPy value of initializers, Constant nodes and folded subgraphs, converted on
    first access: a large model's weights are not all copied up front."""

    def __init__(self, tensors: dict[str, onnx.TensorProto]):
        self.tensors = tensors
        self.values: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        value = self.values.get(name)
        if value is None:
            value = self.values[name] = read_array(self.tensors[name])
        return value

    def __contains__(self, name: object) -> bool:
        return name in self.values or name in self.tensors

    def __iter__(self):
        return iter(dict.fromkeys([*self.tensors, *self.values]))

    def __len__(self) -> int:
        return len(set(self.tensors) | set(self.values))

    def add(self, name: str, value: np.ndarray) -> None:
        self.values[name] = value

    def forget(self) -> None:
        """Drop the converted copies of initializers (they are converted again when read)."""
        for name in [n for n in self.values if n in self.tensors]:
            del self.values[name]

    def size(self, name: str) -> int:
        return int(self.values[name].size) if name in self.values else tensor_size(self.tensors[name])

    def dtype(self, name: str) -> np.dtype:
        if name in self.values:
            return self.values[name].dtype
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.tensors[name].data_type))

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(self.values[name].shape) if name in self.values else tuple(int(d) for d in self.tensors[name].dims)


class GraphIndex:
    """Maps every tensor of the main graph to its producer, consumers, value and shape."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, Shape] | None = None, initializers: list[onnx.TensorProto] | None = None,
                 constants: Constants | None = None):
        """`initializers` replaces the graph's own (a copy being rewritten keeps them in its source);
        `constants`, the values an index of the same graph already converted and folded, are
        taken as they are (a rewrite's working copy: folding again costs more than the rewrite)."""
        self.model = model
        graph = model.graph
        initializers = list(graph.initializer) if initializers is None else initializers
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
        self.constants = Constants({t.name: t for t in initializers}) if constants is None else constants
        self.initializer_names = {t.name for t in initializers}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.uses[name].append(Use(node, i))
            for name in subgraph_reads(node):
                self.uses[name].append(Use(node, IMPLICIT))
            if node.op_type == "Constant" and node.output and constants is None:
                value = _constant_node_value(node)
                if value is not None:
                    self.constants.add(node.output[0], value)
        self.opset = default_opset(model)  # the attribute forms of old shape ops fold at their own opset
        if constants is None:
            for name, value in fold_constants(self.nodes, self.constants, self.opset).items():
                self.constants.add(name, value)
        self.graph_inputs = [i.name for i in graph.input if i.name not in self.initializer_names]
        self.graph_outputs = [o.name for o in graph.output]
        self.shapes: dict[str, Shape] = shapes if shapes is not None else infer_shapes(model)
        for name in self.constants:
            self.shapes.setdefault(name, self.constants.dims(name))

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[id(node)]

    def is_read(self, name: str) -> bool:
        """Whether a node (or a subgraph) reads the tensor or it is a graph output."""
        return bool(name) and (bool(self.uses.get(name)) or name in self.graph_outputs)

    def node(self, label: str) -> onnx.NodeProto:
        return self.by_label[label]

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def const_dims(self, name: str) -> tuple[int, ...]:
        """Shape of a constant without converting it (weights stay in the proto until needed)."""
        return self.constants.dims(name)

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
    "Mul", "Div", "Mod", "Neg", "Range", "ConstantOfShape", "Expand", "Equal", "Where", "Floor", "Ceil", "Transpose",
})
FOLD_LIMIT = 4096
SUFFIX = "_onnxprune"  # what the rewrite appends to the names of the values it creates


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first not in `taken`, which it joins."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def fold_constants(nodes: list[onnx.NodeProto], constants: Constants, opset: int | None = None) -> dict[str, np.ndarray]:
    """Values of the outputs of small nodes whose inputs are all constant (at the model's `opset`)."""
    folded: dict[str, np.ndarray] = {}

    def size(name: str) -> int:
        return int(folded[name].size) if name in folded else constants.size(name)

    for node in nodes:
        inputs = [i for i in node.input if i]
        if node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or not inputs or len(node.output) != 1:
            continue
        if not all(i in folded or i in constants for i in inputs) or sum(size(i) for i in inputs) > FOLD_LIMIT:
            continue
        value = evaluate_node(node, {i: folded[i] if i in folded else constants[i] for i in dict.fromkeys(inputs)}, opset)
        if value is not None and value.size <= FOLD_LIMIT:
            folded[node.output[0]] = value
    return folded


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's version of the standard ONNX opset (None if it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def evaluate_outputs(node: onnx.NodeProto, known: dict[str, np.ndarray], opset: int | None = None) -> list[np.ndarray | None] | None:
    """The node's outputs on known input values (onnx's reference evaluator, at the model's
    `opset`: Unsqueeze, Squeeze, Slice and Split read attributes below opsets 13 / 10), or None
    when they cannot be computed."""
    from onnx.reference import ReferenceEvaluator

    inputs = list(dict.fromkeys(i for i in node.input if i))
    try:
        graph = onnx.helper.make_graph(
            [node], "fold",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape) for i in inputs],
            [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)] if opset else None)
        results = ReferenceEvaluator(model).run(None, {i: known[i] for i in inputs})
    except Exception:  # noqa: BLE001 - folding is an optimisation; unknown values are pinned later
        return None
    values = iter(np.asarray(r) for r in results)
    return [next(values) if o else None for o in node.output]


def evaluate_node(node: onnx.NodeProto, known: dict[str, np.ndarray], opset: int | None = None) -> np.ndarray | None:
    """The first output of a node on known input values, or None when it cannot be computed."""
    values = evaluate_outputs(node, known, opset)
    return None if values is None else values[0]


def weightless_skeleton(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The graph without its large weights (declared as inputs of the same type and shape) and
    with the given input shapes: shape inference needs no weights, and copying them is costly."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor_size(tensor) <= FOLD_LIMIT and not tensor.external_data:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return fix_input_shapes(skeleton, input_shapes)


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], problems: list[str] | None = None) -> dict[str, Shape]:
    """Shapes of every tensor with the inputs fixed and small constant subgraphs folded; why the
    model did not run at these shapes, if it did not, goes to `problems`."""
    skeleton = weightless_skeleton(model, input_shapes)
    constants = Constants({t.name: t for t in skeleton.graph.initializer})
    for node in skeleton.graph.node:
        if node.op_type == "Constant" and (value := _constant_node_value(node)) is not None:
            constants.add(node.output[0], value)
    folded = fold_constants(list(skeleton.graph.node), constants, default_opset(model))
    if folded:
        kept = [n for n in skeleton.graph.node if not (n.output and all(o in folded for o in n.output))]
        del skeleton.graph.node[:]
        skeleton.graph.node.extend(kept)
        skeleton.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items())
    shapes, types = infer_shapes(skeleton, with_types=True)
    probed = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16, onnx.TensorProto.BOOL,
              onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    missing = [  # tensors that can carry or meet units (float activations, masks) or size them (shape vectors: the
        # rules follow a Gather of a Shape by its length) whose shape inference left open
        o for n in skeleton.graph.node for o in n.output
        if o and (o not in shapes or None in shapes[o]) and types.get(o, onnx.TensorProto.FLOAT) in probed
    ]
    if missing:
        shapes.update(probe_shapes(model, input_shapes, missing, problems))
    return shapes


def probe_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], names: list[str],
                 problems: list[str] | None = None) -> dict[str, Shape]:
    """Shapes that static inference missed (computed Slice bounds, Shape subgraphs), read off one
    onnxruntime run of the weightless skeleton on zeros (inputs and weights; np.zeros pages are
    never touched, so the probe costs no copy of the weights)."""
    import onnxruntime as ort

    probe = weightless_skeleton(model, input_shapes)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {}
    for value in probe.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        shape = input_shapes.get(value.name, dims)
        if value.name in input_shapes or (dims and all(d > 0 for d in dims)) or not dims:
            feeds[value.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a failed probe is handled (the analysis pins what stays unknown): no error print
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 - best effort: the analysis pins what stays unknown
        if problems is not None:
            failed = re.search(r"running (\w+) node\. Name:'([^']*)'", str(exc))
            problems.append(f"{failed.group(1)} '{failed.group(2)}' fails" if failed else str(exc).splitlines()[0][:200])
        return {}
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(names, values, strict=True)}


def _dims(type_proto: onnx.TypeProto) -> Shape | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim
    )


def infer_shapes(model: onnx.ModelProto, with_types: bool = False):
    """Static shapes of every tensor onnx can infer (unknown dims are None); with `with_types`
    also their element types."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort; analysis pins what it cannot see
        inferred = model
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return (shapes, types) if with_types else shapes


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The first dimension of a graph input, when the model fixes it (onnxruntime then runs only
    whole batches of that size)."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def whole_batches(samples: int, step: int) -> int:
    """`samples` rounded down to whole batches of a model's fixed batch size `step` (at least one
    batch); unchanged for a free batch size (`step` 1)."""
    return max(step, samples // step * step) if step > 1 else samples


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
