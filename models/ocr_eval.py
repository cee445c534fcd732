"""CTC greedy decoding and OCR metrics for ``crnn_digits.ts.onnx`` (numpy + onnxruntime, no torch).

The CRNN reference model (``train_crnn_digits.py``) emits per-time-step class scores; this
module turns them into strings and scores them, so the pruning benchmark can measure what a
pruned model still reads correctly::

    import sys; sys.path.insert(0, "models")
    import numpy as np
    from ocr_eval import ocr_metrics
    test = np.load("models/data/crnn_test.npz")
    ocr_metrics("models/crnn_digits.ts.onnx", test["input"], test["labels"])

Conventions (those of ``crnn_digits.ts.onnx``):

* logits are ``[T, N, C]`` (time first, ``time_axis=0``); ``[N, T, C]`` works with ``time_axis=1``.
* class ``blank`` is the CTC blank; the other classes are the alphabet in order, i.e. class
  ``k`` is symbol ``k`` when ``k < blank`` and symbol ``k - 1`` when ``k > blank``. With the
  model's ``blank=0`` and ten digits, class ``k`` is digit ``k - 1``.
* labels are an int array ``[N, L]`` of symbols (digits 0-9), or any sequence of symbol sequences.

``char_accuracy`` is ``1 - (total Levenshtein distance) / (total label length)``, i.e. one
minus the character error rate over the whole set. It is used rather than a per-position
match because a CTC decoder can drop or repeat a character, and a per-position comparison
would count every character after such an error as wrong (or could not compare strings of
different lengths at all). It can go below 0 when a model emits many extra characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

Model = ort.InferenceSession | str | Path | onnx.ModelProto | bytes


def greedy_decode(logits: np.ndarray, blank: int = 0, time_axis: int = 0) -> list[tuple[int, ...]]:
    """CTC best-path decoding: argmax per time step, collapse repeats, drop blanks.

    ``logits`` is ``[T, N, C]`` (``time_axis=0``) or ``[N, T, C]`` (``time_axis=1``); scores
    or log-probabilities, since only the argmax matters. Returns one tuple of symbols per
    sample, with the blank removed from the alphabet (see the module docstring).
    """
    if logits.ndim != 3 or time_axis not in (0, 1):
        raise ValueError(f"expected 3-D logits with time_axis 0 or 1, got shape {logits.shape}, time_axis {time_axis}")
    best = logits.argmax(axis=-1)  # [T, N] or [N, T]
    if time_axis == 0:
        best = best.T
    decoded = []
    for path in best:
        keep = np.ones(len(path), dtype=bool)
        keep[1:] = path[1:] != path[:-1]  # collapse repeats (a blank between two equal classes separates them)
        keep &= path != blank
        classes = path[keep]
        decoded.append(tuple(int(c) if c < blank else int(c) - 1 for c in classes))
    return decoded


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit insert/delete/substitute costs) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def make_session(model: Model, threads: int = 2) -> ort.InferenceSession:
    """An onnxruntime CPU session for a session (returned as is), a path, a ModelProto or serialized bytes."""
    if isinstance(model, ort.InferenceSession):
        return model
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning threads crawl on a busy machine
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run_logits(model: Model, x: np.ndarray, batch: int = 200, time_axis: int = 0) -> np.ndarray:
    """The model's first output on ``x``, run ``batch`` samples at a time and joined on the batch axis.

    The batch axis is the one that is not the time axis (axis 1 for ``[T, N, C]`` logits).
    """
    sess = make_session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=1 - time_axis)


def score_sequences(decoded: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict[str, float]:
    """``sequence_accuracy`` (exact matches) and ``char_accuracy`` (1 - total edit distance / total reference length)."""
    if len(decoded) != len(reference):
        raise ValueError(f"{len(decoded)} decoded sequences for {len(reference)} references")
    exact = sum(tuple(d) == tuple(r) for d, r in zip(decoded, reference, strict=True))
    edits = sum(edit_distance(d, r) for d, r in zip(decoded, reference, strict=True))
    chars = sum(len(r) for r in reference)
    return {"sequence_accuracy": exact / len(reference), "char_accuracy": 1.0 - edits / max(chars, 1)}


def ocr_metrics(
    session_or_model: Model,
    x: np.ndarray,
    labels: np.ndarray | Sequence[Sequence[int]],
    batch: int = 200,
    blank: int = 0,
    time_axis: int = 0,
) -> dict[str, float]:
    """Sequence accuracy (decoded string == label) and char accuracy (1 - CER) of a CTC model on ``x``."""
    decoded = greedy_decode(run_logits(session_or_model, x, batch, time_axis), blank, time_axis)
    return score_sequences(decoded, [tuple(int(c) for c in r) for r in labels])


def agreement(
    model_a: Model,
    model_b: Model,
    x: np.ndarray,
    batch: int = 200,
    blank: int = 0,
    time_axis: int = 0,
) -> dict[str, float]:
    """How often two models read the same string on ``x``, taking ``model_a``'s reading as the reference.

    Returns ``sequence_agreement`` (identical decoded strings) and ``char_agreement``
    (1 - edit distance / length of ``model_a``'s strings), e.g. original vs pruned model.
    """
    a = greedy_decode(run_logits(model_a, x, batch, time_axis), blank, time_axis)
    b = greedy_decode(run_logits(model_b, x, batch, time_axis), blank, time_axis)
    scores = score_sequences(b, a)
    return {"sequence_agreement": scores["sequence_accuracy"], "char_agreement": scores["char_accuracy"]}
