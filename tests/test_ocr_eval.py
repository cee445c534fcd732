"""The OCR benchmark's CTC decoding and scores (models/ocr_eval.py) and the committed CRNN's
accuracy read through them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from ocr_eval import agreement, edit_distance, greedy_decode, ocr_metrics, score_sequences  # noqa: E402


def one_hot_steps(classes: list[int], n_classes: int = 11) -> np.ndarray:
    """[T, 1, C] scores whose argmax at step t is classes[t]."""
    logits = np.zeros((len(classes), 1, n_classes), dtype=np.float32)
    logits[np.arange(len(classes)), 0, classes] = 1.0
    return logits


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    # classes 2 2 0 2 3 3 0 0 1 -> digits (class k = digit k-1): 1, 1 (a blank separates them), 2, 0
    assert greedy_decode(one_hot_steps([2, 2, 0, 2, 3, 3, 0, 0, 1])) == [(1, 1, 2, 0)]
    batch_first = np.transpose(one_hot_steps([5, 5, 0, 6]), (1, 0, 2))
    assert greedy_decode(batch_first, time_axis=1) == [(4, 5)]


def test_edit_distance_and_scores():
    assert edit_distance((1, 2, 3, 4), (1, 2, 3, 4)) == 0
    assert edit_distance((1, 2, 4), (1, 2, 3, 4)) == 1 and edit_distance((), (1, 2)) == 2
    scores = score_sequences([(1, 2, 3, 4), (1, 2, 4)], [(1, 2, 3, 4), (1, 2, 3, 4)])
    assert scores == {"sequence_accuracy": 0.5, "char_accuracy": 1 - 1 / 8}


def test_the_committed_crnn_reads_its_test_lines():
    """models/crnn_digits.json records 91.7% of the 1000 test lines; the first 200 are read at
    least 85% right, and a model agrees with itself."""
    with np.load(Path(__file__).resolve().parents[1] / "models" / "data" / "crnn_test.npz") as f:
        x, labels = f["input"][:200], f["labels"][:200]
    model = Path(__file__).resolve().parents[1] / "models" / "crnn_digits.ts.onnx"
    metrics = ocr_metrics(model, x, labels)
    assert metrics["sequence_accuracy"] >= 0.85 and metrics["char_accuracy"] >= 0.95
    assert agreement(model, model, x[:32]) == {"sequence_agreement": 1.0, "char_agreement": 1.0}
