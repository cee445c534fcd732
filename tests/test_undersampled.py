"""Sites that saw few calibration rows: one warning line per kind, each site named once."""

from __future__ import annotations

import numpy as np

import onnxprune
from builders import GraphBuilder, _normal, random_mlp, run


def _warnings_with(report, text: str) -> list[str]:
    return [w for w in report.warnings if text in w]


def test_undersampled_spaces_and_noisy_sites_are_each_one_grouped_warning() -> None:
    """36 calibration rows (40 samples, 4 held out): the four 48-unit spaces are pinned and the two
    16-unit sites are thin. Each kind is one line that counts them and names the first three,
    and the pinned spaces keep every unit."""
    model = random_mlp(widths=(8, 48, 48, 48, 48, 16, 16, 4), seed=1)
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.05, verify_samples=4)
    pinned, noisy = _warnings_with(report, "not pruned"), _warnings_with(report, "noisy")
    assert len(pinned) == 1 and len(noisy) == 1, report.warnings
    assert pinned[0].startswith("4 spaces not pruned") and pinned[0].count("36 rows for 48 units") == 3 and "and 1 more" in pinned[0]
    assert noisy[0].startswith("2 sites saw fewer than 4 calibration rows per unit") and noisy[0].count("36 rows for 16 units") == 2
    assert "more" not in noisy[0].split("(")[1].split(")")[0]
    rows = {row.name: row for row in report.spaces}
    assert [rows[f"fc{i}"].kept for i in range(1, 5)] == [48] * 4 and all(rows[f"fc{i}"].pinned for i in range(1, 5))
    assert np.isfinite(run(pruned, x)).all()


def test_a_pooled_site_shared_by_several_spaces_is_noted_once() -> None:
    """Two conv branches joined by a Concat, then global pooling: with fewer samples than the 32
    pooled channels both branches read the pooled input's positions, and the note says so once."""
    rng = np.random.default_rng(0)
    g = GraphBuilder([None, 3, 6, 6])
    branches = [g.op("Relu", [g.conv(g.input_name, _normal(rng, (16, 3, 3, 3), 27), np.zeros(16, np.float32), name=f"conv_{b}",
                                     pads=[1, 1, 1, 1])]) for b in "ab"]
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Concat", branches, axis=1)], name="gap")])
    model = g.build(g.gemm(pooled, _normal(rng, (32, 5), 32), np.zeros(5, np.float32), name="fc"), ["N", 5])
    x = rng.standard_normal((20, 3, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.2, verify_samples=2)
    notes = _warnings_with(report, "would see")
    assert len(notes) == 1 and "'gap_out': 18 rows for 32 units, reads" in notes[0], report.warnings
    assert len(report.warnings) == len(set(report.warnings))
    assert np.isfinite(run(pruned, x)).all()


def test_many_pooled_sites_are_one_note() -> None:
    """Four conv branches, each pooled to its own Gemm, on 18 calibration samples for 32
    channels: every branch reads its pooled input's positions, and one line says so for all four."""
    rng = np.random.default_rng(0)
    g = GraphBuilder([None, 3, 6, 6])
    heads = []
    for b in range(4):
        conv = g.op("Relu", [g.conv(g.input_name, _normal(rng, (32, 3, 3, 3), 27), np.zeros(32, np.float32), name=f"conv_{b}",
                                    pads=[1, 1, 1, 1])])
        pooled = g.op("Flatten", [g.op("GlobalAveragePool", [conv], name=f"gap_{b}")])
        heads.append(g.gemm(pooled, _normal(rng, (32, 5), 32), np.zeros(5, np.float32), name=f"fc_{b}"))
    model = g.build(g.op("Sum", heads), ["N", 5])
    x = rng.standard_normal((20, 3, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.2, verify_samples=2)
    notes = _warnings_with(report, "pooled input")
    assert len(notes) == 1 and notes[0].startswith("4 pooled sites would see"), report.warnings
    assert notes[0].count("18 rows for 32 units, reads") == 3 and "and 1 more" in notes[0]
    assert np.isfinite(run(pruned, x)).all()
