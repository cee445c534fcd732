"""Issue 6: statistics are additive — shards merge exactly, save/load without pickle, and run in
local processes or on a Dask LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxprune
from onnxprune.api import calibration_statistics, prepare
from onnxprune.cli import main
from onnxprune.shards import Statistics, collect_sharded, model_digest, partial_statistics

MODELS = Path(__file__).resolve().parents[1] / "models"
VGG = MODELS / "vgg_bn.ts.onnx"
CALIB = MODELS / "data" / "fmnist_calib.npz"
OPTIONS = dict(verify_samples=32, calib_samples=160)


def assert_same_stats(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].count == b[name].count
        np.testing.assert_allclose(a[name].total, b[name].total, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(a[name].gram, b[name].gram, rtol=1e-12, atol=1e-9)


def test_merged_shards_equal_a_single_pass():
    single = calibration_statistics(prepare(VGG, CALIB, **OPTIONS))
    parts = [partial_statistics(VGG, CALIB, (i, 3), OPTIONS) for i in range(3)]
    assert sum(p.sites[next(iter(single))].count for p in parts) == single[next(iter(single))].count
    assert_same_stats(Statistics.merge_all(parts).sites, single)


def test_statistics_roundtrip_through_npz_without_pickle(tmp_path):
    stats = partial_statistics(VGG, CALIB, (1, 2), OPTIONS)
    path = tmp_path / "part.npz"
    stats.save(path)
    with np.load(path, allow_pickle=False) as raw:
        assert all(raw[k].dtype != object for k in raw.files)
    loaded = Statistics.load(path)
    assert loaded.digest == stats.digest
    assert_same_stats(loaded.sites, stats.sites)


def test_statistics_of_another_model_are_refused():
    vgg = partial_statistics(VGG, CALIB, (0, 1), OPTIONS)
    other = Statistics("0" * 16, vgg.sites)
    with pytest.raises(onnxprune.CalibrationError, match="different models"):
        vgg.merge(other)
    with pytest.raises(onnxprune.CalibrationError, match="another model"):
        onnxprune.prune(VGG, CALIB, ratio=0.3, statistics=other, **OPTIONS)


def test_prune_with_saved_shards_matches_prune_with_calibration(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"part{i}.npz")
        args = ["stats", str(VGG), "--calib", str(CALIB), "--shard", f"{i}/2", "-o", str(paths[-1]),
                "--verify-samples", "32", "--calib-samples", "160"]
        assert main(args) == 0
    out = tmp_path / "pruned.onnx"
    args = [str(VGG), "--calib", str(CALIB), "--stats", *map(str, paths), "-o", str(out), "--ratio", "0.4", "--round-to", "1",
            "--verify-samples", "32", "--calib-samples", "160", "-q"]
    assert main(args) == 0
    direct, _ = onnxprune.prune(VGG, CALIB, ratio=0.4, **OPTIONS)
    import onnx

    from_shards = onnx.load(out)
    assert [list(t.dims) for t in from_shards.graph.initializer] == [list(t.dims) for t in direct.graph.initializer]
    for a, b in zip(from_shards.graph.initializer, direct.graph.initializer, strict=True):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)


def test_local_processes_give_the_single_pass_statistics():
    prepared = prepare(VGG, CALIB, **OPTIONS)
    merged = collect_sharded(str(VGG), str(CALIB), 2, None, OPTIONS)
    assert merged.digest == model_digest(prepared.original)
    assert_same_stats(merged.sites, calibration_statistics(prepared))


def test_dask_local_cluster_gives_the_single_pass_statistics():
    pytest.importorskip("dask.distributed", reason="the [distributed] extra is not installed")
    prepared = prepare(VGG, CALIB, **OPTIONS)
    merged = collect_sharded(str(VGG), str(CALIB), 2, "local", OPTIONS)
    assert_same_stats(merged.sites, calibration_statistics(prepared))


def test_one_statistics_object_serves_two_sequential_prunes():
    """The sequential pass drops the Grams it no longer reads from its own copy, never from the
    caller's statistics (a second prune with the same object used to fail)."""
    stats = Statistics.merge_all([partial_statistics(VGG, CALIB, (0, 1), OPTIONS)])
    first = onnxprune.prune(VGG, CALIB, flops=0.3, statistics=stats, sequential=True, **OPTIONS).report
    assert all(site.gram.size for site in stats.sites.values())
    second = onnxprune.prune(VGG, CALIB, flops=0.5, statistics=stats, sequential=True, **OPTIONS).report
    assert second.macs_after < first.macs_after
