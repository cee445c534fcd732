"""Verification: the pruned model must pass the checker, run in onnxruntime, and its outputs
are compared with the original's on held-out samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .calibrate import make_session
from .data import CalibrationData
from .errors import ModelError
from .load import model_on_disk, needs_external_data


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
    try:
        if needs_external_data(model):
            with model_on_disk(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and InferenceError
        raise ModelError(f"the pruned model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def run_model(model: onnx.ModelProto, data: CalibrationData, batch_size: int, optimize: bool = True) -> dict[str, np.ndarray]:
    """All outputs of the model on the data, concatenated over batches."""
    session = make_session(model, optimize)
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in data.batches(batch_size):
        for name, value in zip(names, session.run(names, batch), strict=False):
            parts[name].append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def compare_outputs(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray]) -> list[OutputFidelity]:
    result = []
    for name, ref in reference.items():
        got = pruned[name]
        if got.shape != ref.shape:
            raise ModelError(f"pruned output '{name}' has shape {got.shape}, the original {ref.shape}")
        ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        norm = np.linalg.norm(ref64)
        diff = np.linalg.norm(got64 - ref64)
        rel = diff / norm if norm > 0 else float(diff)
        denom = norm * np.linalg.norm(got64)
        cosine = float(ref64 @ got64 / denom) if denom > 0 else float(diff == 0)
        top1 = None
        if ref.ndim == 2 and ref.shape[1] > 1:
            top1 = float(np.mean(ref.argmax(axis=1) == got.argmax(axis=1)))
        result.append(OutputFidelity(name, float(rel), cosine, float(np.max(np.abs(got64 - ref64), initial=0.0)), top1))
    return result


def verify(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    io_changes: dict[str, tuple[int, np.ndarray]] | None = None,
) -> list[OutputFidelity]:
    """Checker + onnxruntime run + comparison with the original on `data`.

    Inputs and outputs whose unit axis shrank (KV caches, `io_changes`) are fed and compared on
    the kept units only."""
    check_model(pruned)
    if data.n_samples == 0:
        return []
    io_changes = io_changes or {}
    shrink = {name: change for name, change in io_changes.items() if name in data.arrays}
    pruned_data = CalibrationData({k: _drop(v, shrink.get(k)) for k, v in data.arrays.items()}, data.source)
    reference = run_model(original, data, batch_size)
    reference = {k: _drop(v, io_changes.get(k)) for k, v in reference.items()}
    optimised = run_model(pruned, pruned_data, batch_size)
    plain = run_model(pruned, pruned_data, batch_size, optimize=False)
    for name, value in optimised.items():  # onnxruntime's graph optimisations must not change the result
        scale = max(float(np.abs(value).max(initial=0.0)), 1e-12)
        rtol = 1e-3 if value.dtype.itemsize >= 4 else 3e-2  # half precision kernels round differently
        if not np.allclose(value, plain[name], rtol=rtol, atol=rtol * 0.1 * scale):
            raise ModelError(f"the pruned model's output '{name}' differs with onnxruntime optimisations on and off; not writing it")
    return compare_outputs(reference, optimised)


def _drop(array: np.ndarray, change: tuple[int, np.ndarray] | None) -> np.ndarray:
    return array if change is None else np.delete(array, change[1], axis=change[0])
