"""Verification: the pruned model must pass the checker, run in onnxruntime, and its outputs
are compared with the original's on held-out samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import make_session
from .data import CalibrationData
from .errors import ModelError
from .graph import fixed_batch_size
from .load import checker_problem, release_memory
from .weights import LARGE_MODEL, model_bytes


@dataclass
class OutputFidelity:
    """How close one output of the pruned model is to the original's."""

    name: str
    relative_l2: float
    cosine: float
    max_abs: float
    top1_agreement: float | None


def check_model(model: onnx.ModelProto) -> None:
    """Full ONNX check (with shape inference); raises ModelError naming the problem."""
    problem = checker_problem(model, full_check=True)
    if problem:
        raise ModelError(f"the pruned model fails onnx.checker: {problem}")


CHUNK = 1 << 20  # output elements compared per step
CHECK_SAMPLES = 8  # samples run without onnxruntime's graph optimisations (one for a large model)


class _Agreement:
    """Running sums for one output, batch by batch (a language model's logits over the
    verification samples would not fit in memory at once)."""

    def __init__(self, name: str):
        self.name = name
        self.ref2 = self.got2 = self.dot = self.diff2 = self.max_abs = 0.0
        self.matches = self.rows = 0
        self.classes = True

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
        self.classes = self.classes and ref.ndim == 2 and ref.shape[1] > 1
        if self.classes:
            self.matches += int(np.sum(ref.argmax(axis=1) == got.argmax(axis=1)))
            self.rows += len(ref)

    def result(self) -> OutputFidelity:
        norm, diff = np.sqrt(self.ref2), np.sqrt(self.diff2)
        rel = diff / norm if norm > 0 else float(diff)
        denom = norm * np.sqrt(self.got2)
        cosine = self.dot / denom if denom > 0 else float(diff == 0)
        top1 = self.matches / self.rows if self.classes and self.rows else None
        return OutputFidelity(self.name, float(rel), float(cosine), self.max_abs, top1)


def compare_outputs(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> list[OutputFidelity]:
    result = []
    for name, ref in reference.items():
        agreement = _Agreement(name)
        agreement.add(ref, pruned[name])
        result.append(agreement.result())
    return result


def _check_optimisations(pruned: onnx.ModelProto, batch: dict[str, np.ndarray], optimised: dict[str, np.ndarray]) -> None:
    """onnxruntime's graph optimisations must not change the result (a few samples show a broken rewrite)."""
    session = make_session(pruned, optimize=False)
    for name, value in zip([o.name for o in session.get_outputs()], session.run(None, batch), strict=True):
        if not _close(optimised[name].reshape(-1), value.reshape(-1), rtol=1e-3 if value.dtype.itemsize >= 4 else 3e-2):
            raise ModelError(f"the pruned model's output '{name}' differs with onnxruntime optimisations on and off; not writing it")


def _close(got: np.ndarray, expected: np.ndarray, rtol: float) -> bool:
    """np.allclose with atol = rtol/10 of the largest |expected|, one chunk at a time (a language
    model's logits would need several full-size temporaries). Half precision kernels round
    differently, hence the caller's wider rtol for them."""
    if got.shape != expected.shape:
        return False
    scale = max((float(np.abs(expected[i:i + CHUNK]).max(initial=0.0)) for i in range(0, expected.size, CHUNK)), default=0.0)
    atol = rtol * 0.1 * max(scale, 1e-12)
    return all(np.allclose(got[i:i + CHUNK], expected[i:i + CHUNK], rtol=rtol, atol=atol) for i in range(0, expected.size, CHUNK))


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
    pruned_session = make_session(pruned)
    agreements = {name: _Agreement(name) for name in names}
    first: tuple[dict, dict] | None = None
    take = None if fixed_batch_size(pruned) else 1 if original_bytes >= LARGE_MODEL else CHECK_SAMPLES
    for i, batch in enumerate(batches):
        pruned_batch = {k: drop_units(v, io_changes.get(k)) for k, v in batch.items()}
        expected = reference[i] if i < len(reference) else dict(zip(names, reference_session.run(names, batch), strict=True))
        got = dict(zip(names, pruned_session.run(names, pruned_batch), strict=True))
        first = first or ({k: v[:take].copy() for k, v in pruned_batch.items()}, {k: v[:take].copy() for k, v in got.items()})
        for name in names:
            agreements[name].add(drop_units(expected[name], io_changes.get(name)), got[name])
        if i < len(reference):
            reference[i] = {}
    reference_session = pruned_session = got = expected = None
    release_memory(original)
    _check_optimisations(pruned, *first)  # one unoptimised session at a time
    return [agreements[name].result() for name in names]


def drop_units(array: np.ndarray, change: tuple[int, np.ndarray] | None) -> np.ndarray:
    """The array without the pruned units of a shrunk graph input/output, (axis, positions)."""
    return array if change is None else np.delete(array, change[1], axis=change[0])
