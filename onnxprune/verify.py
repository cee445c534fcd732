"""Verification: the pruned model must pass the checker, run in onnxruntime, and its outputs
are compared with the original's on held-out samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import make_session
from .data import CalibrationData
from .errors import ModelError
from .graph import default_opset, fixed_batch_size, get_attr
from .load import checker_problem, release_memory
from .weights import LARGE_MODEL, model_bytes


@dataclass
class OutputFidelity:
    """How close one output of the pruned model is to the original's."""

    name: str
    relative_l2: float
    cosine: float
    max_abs: float
    top1_agreement: float | None  # argmax agreement per row of a 2-D float output, per position of class scores (a language model's next token), or the share of an ArgMax output's indices unchanged


FAR_L2, FAR_TOP1 = 0.8, 0.5  # a pruned output this far from the original's is worth a warning


def far_outputs_warning(fidelity: list[OutputFidelity]) -> list[str]:
    """A warning naming the outputs the pruned model gets far from the original's on the
    held-out samples (relative L2 >= 0.8 or top-1 agreement < 50%): the model is written, but
    it is not a faithful copy."""
    far = [f for f in fidelity if f.relative_l2 >= FAR_L2 or (f.top1_agreement is not None and f.top1_agreement < FAR_TOP1)]
    if not far:
        return []
    shown = ", ".join(f"'{f.name}' (relative L2 {f.relative_l2:.2f}"
                      + ("" if f.top1_agreement is None else f", top-1 agreement {f.top1_agreement:.0%}") + ")" for f in far[:2])
    return [f"the pruned model's outputs are far from the original's on the held-out samples: {shown}; a smaller target, "
            "more (and more varied) calibration samples, or --tolerance to bound the loss"]


def check_model(model: onnx.ModelProto) -> None:
    """Full ONNX check (with shape inference); raises ModelError naming the problem."""
    problem = checker_problem(model, full_check=True)
    if problem:
        raise ModelError(f"the pruned model fails onnx.checker: {problem}")


LOGIT_PRODUCERS = frozenset({"Gemm", "MatMul"})
PASS_THROUGH = frozenset({"Add", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast"})
LOGITS, PROBABILITIES = "logits", "probabilities"  # class scores: log-softmax them, or take their log first


def logit_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Graph outputs that hold class scores over their last axis, with their kind: logits that
    a Gemm/MatMul head produces (through bias adds and reshapes) or a LogSoftmax's log-probabilities
    (LOGITS: log-softmax is the identity on them), or a Softmax's probabilities (PROBABILITIES)."""
    producer, ranks, opset = _walk_context(model)
    found = {}
    for output in model.graph.output:
        if kind := _score_kind(output.name, producer, ranks, opset):
            found[output.name] = kind
    return found


def argmax_outputs(model: onnx.ModelProto) -> dict[str, tuple[str, int, str]]:
    """Graph outputs that are an ArgMax's indices (greedy CTC decoding, a segmentation mask):
    output -> (the scores the ArgMax reads, their class axis, their kind). A pruned model is
    judged on those scores: the indices rarely move on a few held-out samples."""
    producer, ranks, opset = _walk_context(model)
    found = {}
    for output in model.graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze") and node.input[0] in producer:
            node = producer[node.input[0]]
        if node is None or node.op_type != "ArgMax" or get_attr(node, "select_last_index", 0):
            continue
        scores, axis, rank = node.input[0], get_attr(node, "axis", 0), ranks.get(node.input[0])
        if axis < 0 and rank is not None:
            axis += rank
        if axis >= 0 or axis == -1:  # a negative axis stays only as the last one, when the rank is unknown
            last = axis == -1 or (rank is not None and axis == rank - 1)
            found[output.name] = (scores, -1 if last else axis, _score_kind(scores, producer, ranks, opset, axis) or LOGITS)
    return found


def _walk_context(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, int], int]:
    producer = {out: node for node in model.graph.node for out in node.output}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
             if v.type.tensor_type.HasField("shape")}
    return producer, ranks, default_opset(model) or 13


def _score_kind(name: str, producer: dict[str, onnx.NodeProto], ranks: dict[str, int], opset: int, axis: int = -1) -> str | None:
    """LOGITS or PROBABILITIES when the tensor holds class scores over `axis` (a (Log)Softmax over
    it, or a Gemm/MatMul head for the last axis), else None."""
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in LOGIT_PRODUCERS:
            return LOGITS
        if node.op_type in ("Softmax", "LogSoftmax"):
            if not _over_axis(node, ranks.get(node.output[0]), opset, axis):
                return None
            return LOGITS if node.op_type == "LogSoftmax" else PROBABILITIES
        if node.op_type not in PASS_THROUGH:
            return None
        # an Add's bias may come first (TorchScript writes a 3-D Linear as Add(bias, MatMul)): follow the computed input
        name = next((i for i in node.input[:2] if i in producer and producer[i].op_type not in ("Constant", "Identity")), node.input[0]) \
            if node.op_type == "Add" else node.input[0]
    return None


def _over_axis(node: onnx.NodeProto, rank: int | None, opset: int, wanted: int = -1) -> bool:
    """Whether a (Log)Softmax normalises each position over axis `wanted` alone (-1: the last;
    before opset 13 it flattens from its axis, default 1, on: one distribution per position only
    for the last axis)."""
    axis = get_attr(node, "axis", -1 if opset >= 13 else 1)
    if rank is not None:
        axis, wanted = axis % rank, wanted % rank
    if opset < 13:
        return axis == wanted and (axis == -1 or (rank is not None and axis == rank - 1))
    return axis == wanted


CHUNK = 1 << 20  # output elements compared per step
CHECK_SAMPLES = 8  # samples run without onnxruntime's graph optimisations (one for a large model)


class _Agreement:
    """Running sums for one output, batch by batch (a language model's logits over the
    verification samples would not fit in memory at once)."""

    def __init__(self, name: str, logits: bool = False, indices: bool = False):
        self.name = name
        self.indices = indices  # an ArgMax's class indices: agreement is the share left unchanged
        self.ref2 = self.got2 = self.dot = self.diff2 = self.max_abs = 0.0
        self.matches = self.rows = 0
        self.classes = True
        self.logits = logits  # class scores over the last axis at every position (`logit_outputs`)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        if got.shape != ref.shape:
            raise ModelError(f"pruned output '{self.name}' has shape {got.shape}, the original {ref.shape}")
        flat_ref, flat_got = ref.reshape(-1), got.reshape(-1)
        for start in range(0, flat_ref.size, CHUNK):  # float64 copies of one chunk at a time
            ref64 = flat_ref[start:start + CHUNK].astype(np.float64)
            got64 = flat_got[start:start + CHUNK].astype(np.float64)
            self.ref2 += float(ref64 @ ref64)
            self.got2 += float(got64 @ got64)
            self.dot += float(ref64 @ got64)
            got64 -= ref64
            self.diff2 += float(got64 @ got64)
            self.max_abs = max(self.max_abs, float(np.max(np.abs(got64), initial=0.0)))
        if self.indices:
            self.matches += int(np.sum(ref == got))
            self.rows += ref.size
            return
        self.classes = self.classes and np.issubdtype(ref.dtype, np.floating) and ref.ndim >= 2 and ref.shape[-1] > 1 \
            and (ref.ndim == 2 or self.logits)
        if self.classes:
            self.matches += int(np.sum(ref.argmax(axis=-1) == got.argmax(axis=-1)))
            self.rows += ref.size // ref.shape[-1]

    def result(self) -> OutputFidelity:
        norm, diff = np.sqrt(self.ref2), np.sqrt(self.diff2)
        rel = diff / norm if norm > 0 else float(diff)
        denom = norm * np.sqrt(self.got2)
        cosine = self.dot / denom if denom > 0 else float(diff == 0)
        top1 = self.matches / self.rows if (self.classes or self.indices) and self.rows else None
        return OutputFidelity(self.name, float(rel), float(cosine), self.max_abs, top1)


def compare_outputs(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> list[OutputFidelity]:
    result = []
    for name, ref in reference.items():
        agreement = _Agreement(name)
        agreement.add(ref, pruned[name])
        result.append(agreement.result())
    return result


OPTIMISATION_FACTOR = 10.0  # the pruned model's on/off difference may be this many times the original's
OPTIMISATION_FLOOR = {4: 1e-5, 2: 1e-2}  # plus this x max(1, largest |output|), by bytes per element


@dataclass
class _Probe:
    """The first samples of the verification: the original's and the pruned model's inputs and
    their optimised outputs, to run again without onnxruntime's graph optimisations."""

    original_inputs: dict[str, np.ndarray]
    original_outputs: dict[str, np.ndarray]
    pruned_inputs: dict[str, np.ndarray]
    pruned_outputs: dict[str, np.ndarray]


def _probe(inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], pruned_inputs: dict[str, np.ndarray],
           got: dict[str, np.ndarray], take: int | None) -> _Probe:
    """The first `take` samples of a batch and their outputs (copies); the whole batch when an
    output does not carry the samples on axis 0 (a CRNN's time-first [T, N, C] logits), whose
    rows could not be cut to match the inputs."""
    count = len(next(iter(inputs.values())))
    if any(v.ndim == 0 or v.shape[0] != count for v in [*expected.values(), *got.values()]):
        take = None
    return _Probe(*({k: v[:take].copy() for k, v in d.items()} for d in (inputs, expected, pruned_inputs, got)))


def _on_off_difference(model: onnx.ModelProto, inputs: dict[str, np.ndarray], optimised: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, the largest |difference| between the optimised outputs and an unoptimised run."""
    session = make_session(model, optimize=False)
    names = [o.name for o in session.get_outputs()]
    return {name: _max_difference(optimised[name], value) for name, value in zip(names, session.run(names, inputs), strict=True)}


def _max_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| one chunk at a time; equal values (also infinities, NaN in both) count 0, a
    NaN in only one of them counts infinity; different shapes are infinitely different."""
    if a.shape != b.shape:
        return float("inf")
    a, b, worst = a.reshape(-1), b.reshape(-1), 0.0
    for i in range(0, a.size, CHUNK):
        x, y = a[i:i + CHUNK].astype(np.float64), b[i:i + CHUNK].astype(np.float64)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        diff = np.where(same, 0.0, np.abs(x - y))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
    return worst


def _check_optimisations(original: onnx.ModelProto, pruned: onnx.ModelProto, probe: _Probe) -> None:
    """onnxruntime's graph optimisations must not change the pruned model's result more than they
    change the original's on the same samples (plus a small floor): a broken rewrite shows there,
    while a model that is itself sensitive, or whose outputs are tiny, is not refused."""
    base = _on_off_difference(original, probe.original_inputs, probe.original_outputs)
    got = _on_off_difference(pruned, probe.pruned_inputs, probe.pruned_outputs)
    for name, difference in got.items():
        value = probe.pruned_outputs[name]
        scale = float(np.abs(probe.original_outputs[name]).max(initial=0.0)) if probe.original_outputs[name].size else 0.0
        floor = OPTIMISATION_FLOOR[4 if value.dtype.itemsize >= 4 else 2] * max(scale, 1.0)
        allowed = OPTIMISATION_FACTOR * base.get(name, 0.0) + floor
        if not difference <= allowed:
            raise ModelError(
                f"the pruned model's output '{name}' differs with onnxruntime optimisations on and off (max |diff| {difference:.3g}, "
                f"the original's {base.get(name, 0.0):.3g}); not writing it"
            )


def optimisation_problem(original: onnx.ModelProto, pruned: onnx.ModelProto, batch: dict[str, np.ndarray],
                         expected: dict[str, np.ndarray], io_changes: dict[str, tuple[int, np.ndarray]] | None = None) -> str | None:
    """Why `pruned` would fail verification's optimisations-on/off check on the first samples
    of `batch` (None: it passes), without raising: to reject a candidate model before it is chosen.
    `expected` holds the original's optimised outputs on `batch` (the held-out reference has them)."""
    pruned_batch = {k: drop_units(v, (io_changes or {}).get(k)) for k, v in batch.items()}
    session = make_session(pruned, rewritten=True)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, pruned_batch), strict=True))
    session = None
    probe = _probe(batch, expected, pruned_batch, got, None if fixed_batch_size(pruned) else CHECK_SAMPLES)
    try:
        _check_optimisations(original, pruned, probe)
    except ModelError as exc:
        return str(exc).replace("; not writing it", "")
    return None


def verify(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    io_changes: dict[str, tuple[int, np.ndarray]] | None = None,
) -> list[OutputFidelity]:
    """Checker + onnxruntime run + comparison with the original on `data`, batch by batch.

    Inputs and outputs whose unit axis shrank (KV caches, `io_changes`) are fed and compared on
    the kept units only."""
    check_model(pruned)
    if data.n_samples == 0:
        return []
    io_changes = io_changes or {}
    original_bytes = model_bytes(original)
    reference_session = make_session(original)
    names = [o.name for o in reference_session.get_outputs()]
    batches = list(data.batches(batch_size))
    reference = [dict(zip(names, reference_session.run(names, batches[0]), strict=True))]
    # keep the original's outputs and run one session at a time, unless they are bigger than the
    # model: then both sessions run batch by batch
    if sum(v.nbytes for v in reference[0].values()) * len(batches) <= original_bytes:
        reference += [dict(zip(names, reference_session.run(names, batch), strict=True)) for batch in batches[1:]]
        reference_session = None
        release_memory(original)
    pruned_session = make_session(pruned, rewritten=True)
    logits, indices = logit_outputs(original), argmax_outputs(original)
    agreements = {name: _Agreement(name, name in logits, name in indices) for name in names}
    probe: _Probe | None = None
    take = None if fixed_batch_size(pruned) else 1 if original_bytes >= LARGE_MODEL else CHECK_SAMPLES
    for i, batch in enumerate(batches):
        pruned_batch = {k: drop_units(v, io_changes.get(k)) for k, v in batch.items()}
        expected = reference[i] if i < len(reference) else dict(zip(names, reference_session.run(names, batch), strict=True))
        got = dict(zip(names, pruned_session.run(names, pruned_batch), strict=True))
        probe = probe or _probe(batch, expected, pruned_batch, got, take)
        for name in names:
            agreements[name].add(drop_units(expected[name], io_changes.get(name)), got[name])
        if i < len(reference):
            reference[i] = {}
    reference_session = pruned_session = got = expected = None
    release_memory(original)
    _check_optimisations(original, pruned, probe)  # one unoptimised session at a time
    return [agreements[name].result() for name in names]


def drop_units(array: np.ndarray, change: tuple[int, np.ndarray] | None) -> np.ndarray:
    """The array without the pruned units of a shrunk graph input/output, (axis, positions)."""
    return array if change is None else np.delete(array, change[1], axis=change[0])
