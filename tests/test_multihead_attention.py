"""nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoderLayer): the packed in-projection
is unflattened into parts, unbound by Gather, and the heads are folded into the batch axis; its
heads are units (models/build_vit_mha.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import relative_l2, run
from onnxprune.analyse import _grouped_labels

MODELS = Path(__file__).resolve().parents[1] / "models" / "transformers"
CALIB = MODELS / "vit_mha_calib.npz"
EXPORTERS = ["ts", "dynamo"]


def images(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)


def head_spaces(report) -> list:
    return [s for s in report.spaces if s.units == 4]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_heads_and_mlp_neurons_of_every_layer_are_prunable(exporter: str) -> None:
    report = onnxprune.inspect_model(MODELS / f"vit_mha.{exporter}.onnx", {"images": (1, 3, 16, 16)})
    prunable = [s for s in report.spaces if not s.pinned]
    assert sorted(s.units for s in prunable) == [4, 4, 64, 64], [(s.name, s.units, s.pinned) for s in report.spaces]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_the_planted_duplicate_head_goes_exactly_and_the_batch_stays_free(exporter: str) -> None:
    """Head 3 of layer 0 copies head 1: its output block is recovered exactly in out_proj. The
    folded [S, B x H, d] view gets a -1 entry, so batches other than the analysis's 1 run."""
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, report = onnxprune.prune(path, CALIB, tolerance=1e-6, order="pivoted", sequential=False)
    kept = sorted(s.kept for s in head_spaces(report))
    assert kept == [3, 4], [(s.name, s.kept, s.units) for s in report.spaces]
    onnx.checker.check_model(pruned, full_check=True)
    original = onnx.load(path)
    for batch in (1, 3):
        x = images(batch)
        assert relative_l2(run(original, x), run(pruned, x)) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_half_the_units_removed_gives_a_smaller_model_that_runs_at_any_batch(exporter: str) -> None:
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, report = onnxprune.prune(path, CALIB, ratio=0.5, allocation="uniform", head_gain=1.0)
    assert all(s.kept == 2 for s in head_spaces(report)), [(s.name, s.kept) for s in report.spaces]
    assert report.params_after < report.params_before
    original = onnx.load(path)
    for batch in (1, 5):
        x = images(batch, seed=batch)
        before, after = run(original, x), run(pruned, x)
        assert after.shape == before.shape and np.isfinite(after).all()
        assert relative_l2(before, after) < 1.0


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ratio_0_is_bit_identical(exporter: str) -> None:
    path = MODELS / f"vit_mha.{exporter}.onnx"
    pruned, _ = onnxprune.prune(path, CALIB, ratio=0.0)
    x = images(3)
    assert np.array_equal(run(onnx.load(path), x), run(pruned, x))


def test_grouped_labels_coarsen_aliased_features_into_heads() -> None:
    """q, k and v features j are one unit (aliased); heads of 2 features group them by pairs."""
    assert _grouped_labels([0, 1, 2, 3] * 3, 2) == [0, 1] * 3
    assert _grouped_labels([0, 1, 2, 3, 1, 0, 2, 3], 2) is None  # a run that is not one whole group
    assert _grouped_labels([0, 1, 2], 2) is None
