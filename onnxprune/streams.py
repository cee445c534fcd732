"""Where a space's error ends up: the residual stream that its consumers' outputs join.

The global threshold normalises the energy a cut loses by the space's own energy, so a block
whose output is a small addition to a large residual stream looks as costly to cut as the one
that makes the stream. The `stream` allocation scales every space's normalised energies by
E||consumer output||^2 / E||stream||^2, measured on the original model: one threshold then
compares the relative perturbation of the tensor each error flows into (docs/design.md,
"Allocation across layers"). A consumer whose output does not reach a residual Add through
affine, shape-only ops counts its own output as the stream (gain 1: the global rule)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .analyse import Analysis
from .calibrate import PREFIX, make_session
from .data import CalibrationData
from .errors import ModelError
from .graph import GraphIndex, fixed_batch_size, whole_batches
from .ops import RECURRENT_GATES

# ops that carry a consumer's output to the residual Add unchanged up to an affine map per element
SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast", "BatchNormalization"})
AFFINE_WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div"})
JOINS = frozenset({"Add", "Sum"})
WALK_LIMIT = 16
STREAM_SAMPLES = 32  # calibration samples the energies are measured on, at most
STREAM_ROWS = 2048  # ... or fewer, once every measured consumer output has this many rows (positions or tokens)
GAIN_LIMITS = (1e-4, 10.0)


def stream_tensor(index: GraphIndex, tensor: str) -> str | None:
    """The output of the first Add that joins `tensor` (through shape-only ops and constant
    affine ops, each its only reader) with another non-constant tensor: the residual stream."""
    name = tensor
    for _ in range(WALK_LIMIT):
        uses = index.uses.get(name, [])
        if len(uses) != 1 or name in index.graph_outputs:
            return None
        node, position = uses[0].node, uses[0].index
        others = [x for i, x in enumerate(node.input) if i != position and x]
        constant = all(index.is_constant(x) for x in others)
        if node.op_type in JOINS and not constant:
            return node.output[0]
        affine = node.op_type in AFFINE_WITH_CONSTANT and constant and (node.op_type != "Div" or position == 0)
        if node.op_type in SHAPE_ONLY or affine:
            name = node.output[0]
            continue
        return None
    return None


def consumer_streams(analysis: Analysis, index: GraphIndex) -> dict[int, list[tuple[str, str | None]]]:
    """Per prunable space: (consumer output, the stream it joins or None) for each consumer."""
    found: dict[int, list[tuple[str, str | None]]] = {}
    for space in analysis.prunable:
        pairs = []
        for label in dict.fromkeys(c.node for c in space.consumers):
            node = index.node(label)  # a recurrent op's output is not linear in its input units
            pairs.append((node.output[0], None if node.op_type in RECURRENT_GATES else stream_tensor(index, node.output[0])))
        found[space.id] = pairs
    return found


def energy_patch(tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A patch (see `calibrate.instrument`) whose outputs are the float32 sum of squares of each tensor."""
    patch = onnx.ModelProto()
    names = []
    for i, tensor in enumerate(tensors):
        p = f"{PREFIX}energy{i}_"
        patch.graph.node.extend([
            helper.make_node("Cast", [tensor], [p + "x"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSumSquare", [p + "x"], [p + "sum"], keepdims=0),
        ])
        patch.graph.output.append(helper.make_tensor_value_info(p + "sum", TensorProto.FLOAT, None))
        names.append(p + "sum")
    return patch, names


@dataclass
class StreamGains:
    """Per space, E||consumer outputs||^2 / E||streams they join||^2 (1: no residual stream)."""

    gains: dict[int, float]
    samples: int
    seconds: float
    failed: str | None = None  # why the energies could not be measured (auto then runs without the rule)

    def summary(self, names: dict[int, str]) -> dict:
        scaled = {names.get(sid, str(sid)): round(g, 5) for sid, g in self.gains.items() if g != 1.0}
        summary = {"samples": self.samples, "seconds": round(self.seconds, 2), "gains": scaled}
        return {**summary, "failed": self.failed} if self.failed else summary


def rows_per_sample(index: GraphIndex, tensor: str, shapes: dict) -> int | None:
    """Positions (conv outputs) or tokens (MatMul/Gemm outputs) of `tensor` in one sample."""
    shape = shapes.get(tensor)
    producer = index.producer.get(tensor)
    if shape is None or producer is None or any(not isinstance(d, int) for d in shape):
        return None
    dims = shape[2:] if producer.op_type == "Conv" else shape[1:-1]
    return int(np.prod(dims, dtype=np.int64))


def samples_needed(index: GraphIndex, outputs: list[str], shapes: dict, most: int = STREAM_SAMPLES) -> int:
    """Enough samples for STREAM_ROWS rows of every consumer output (at least 2, at most `most`)."""
    rows = [r for t in outputs if (r := rows_per_sample(index, t, shapes))]
    return int(np.clip(-(-STREAM_ROWS // min(rows)), 2, most)) if rows else most


def measure_stream_gains(original: onnx.ModelProto, analysis: Analysis, index: GraphIndex, data: CalibrationData,
                         batch_size: int, shapes: dict | None = None, samples: int | None = None) -> StreamGains:
    """Run the original on the first calibration samples (`samples`, or enough for STREAM_ROWS
    rows per consumer given the per-sample `shapes`) and measure every consumer's output energy
    and the energy of the stream it joins."""
    start = time.perf_counter()
    pairs = consumer_streams(analysis, index)
    joined = {sid: rows for sid, rows in pairs.items() if any(stream for _, stream in rows)}
    tensors = list(dict.fromkeys(t for rows in joined.values() for out, stream in rows for t in (out, stream) if t))
    if not tensors or not data.n_samples:
        return StreamGains(dict.fromkeys(pairs, 1.0), 0, time.perf_counter() - start)
    if samples is None:
        samples = samples_needed(index, [out for rows in joined.values() for out, _ in rows], shapes or {})
    patch, names = energy_patch(tensors)  # ReduceSumSquare without axes sums everything, in every opset
    session = make_session(original, patch=patch, spinning=False)
    step = fixed_batch_size(original) or 1  # a fixed batch runs whole batches only
    taken = whole_batches(min(samples, data.n_samples), step) if data.n_samples >= step else 0
    totals = np.zeros(len(tensors))
    try:
        for batch in data.take(0, taken).batches(step if step > 1 else batch_size):
            totals += np.array([float(v) for v in session.run(names, batch)])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise ModelError(f"onnxruntime failed measuring the residual streams: {str(exc).splitlines()[0]}") from None
    energy = dict(zip(tensors, totals, strict=True))
    gains = dict.fromkeys(pairs, 1.0)
    for sid, rows in joined.items():
        own = sum(energy[out] for out, _ in rows)
        total = sum(energy[stream or out] for out, stream in rows)
        if own > 0 and total > 0 and np.isfinite(own / total):
            gains[sid] = float(np.clip(own / total, *GAIN_LIMITS))
    return StreamGains(gains, taken, time.perf_counter() - start)
