"""Issue 6: in-graph statistics — float32 Gram per batch about a fixed centre, float64 accumulation,
spatial subsampling of expensive conv sites, and the options that control it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, cli, run, run_tensors, treat_as_large
from onnxprune import calibrate
from onnxprune.analyse import Site, analyse
from onnxprune.api import calibration_statistics, prepare
from onnxprune.calibrate import choose_strides, collect_stats
from onnxprune.graph import GraphIndex, static_shapes
from onnxprune.shards import Statistics, partial_statistics
from onnxprune.stats import SiteStats


def offset_cnn(hw: int, c_in: int = 4, hidden: int = 24, offset: float = 8.0, seed: int = 0) -> onnx.ModelProto:
    """Conv -> +offset (a site whose mean is many standard deviations) -> 1x1 Conv -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder([None, c_in, hw, hw])
    x = g.conv(g.input_name, rng.standard_normal((hidden, c_in, 3, 3)).astype(np.float32) / 6,
               np.full(hidden, offset, np.float32) + rng.standard_normal(hidden).astype(np.float32), name="conv1", pads=[1, 1, 1, 1])
    x = g.conv(x, rng.standard_normal((8, hidden, 1, 1)).astype(np.float32) / 5, None, name="conv2")
    x = g.op("Relu", [x])
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x])
    x = g.gemm(x, rng.standard_normal((8, 3)).astype(np.float32), None, name="fc")
    return g.build(x, ["N", 3])


def reference_stats(model: onnx.ModelProto, x: np.ndarray, site: Site, stride: int = 1) -> SiteStats:
    (act,) = run_tensors(model, x, [site.tensor])
    if stride > 1:
        act = act[:, :, ::stride, ::stride]
    return SiteStats.from_rows(np.moveaxis(act, site.axis, -1).reshape(-1, site.width))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measured(model: onnx.ModelProto, x: np.ndarray, batch: int, strides: dict | None = None, per_sample: bool = True) -> tuple[list[Site], dict]:
    """collect_stats; with `per_sample` it knows the shapes, so wide feature maps get per-sample Grams."""
    sites = analyse(model).sites()
    index = GraphIndex(model)
    ranks = {s.tensor: index.rank(s.tensor) for s in sites}
    batches = [{"x": x[i:i + batch]} for i in range(0, len(x), batch)]
    return sites, collect_stats(model, sites, ranks, batches, strides=strides, shapes=index.shapes if per_sample else None)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample-grams", "rows"])
def test_float32_gram_of_large_conv_batches_matches_a_float64_reference(per_sample: bool) -> None:
    """36,864 rows per batch whose mean is ~8 standard deviations: the augmented Gram [1 X]^T [1 X]
    is within 1e-6 and the covariance (what SNP ranks) within 1e-6 of float64 NumPy, with the
    per-sample [N, C, C] Grams of a wide map and with the [rows, C] layout."""
    model = offset_cnn(hw=48)
    x = np.random.default_rng(1).standard_normal((32, 4, 48, 48)).astype(np.float32)
    sites, stats = measured(model, x, batch=16, per_sample=per_sample)
    site = next(s for s in sites if s.tensor == "conv1_out")
    reference, got = reference_stats(model, x, site), stats[site.tensor]
    assert got.count == reference.count == 32 * 48 * 48
    assert relative(got.augmented(), reference.augmented()) <= 1e-6
    assert relative(got.covariance(), reference.covariance()) <= 1e-6
    mean_over_std = np.abs(reference.mean()) / np.sqrt(np.diag(reference.covariance()))
    assert mean_over_std.min() > 3  # the case an uncentred float32 Gram gets wrong


def test_float32_gram_of_a_large_matmul_site_matches_a_float64_reference() -> None:
    rng = np.random.default_rng(2)
    g = GraphBuilder([None, 512, 16])
    y = g.matmul("x", rng.standard_normal((16, 48)).astype(np.float32), (5 + rng.standard_normal(48)).astype(np.float32), name="fc1")
    y = g.matmul(y, rng.standard_normal((48, 4)).astype(np.float32), None, name="fc2")
    model = g.build(y, ["N", 512, 4])
    x = rng.standard_normal((96, 512, 16)).astype(np.float32)
    sites, stats = measured(model, x, batch=48)  # 24,576 token rows per batch
    (site,) = sites
    (act,) = run_tensors(model, x, [site.tensor])
    reference = SiteStats.from_rows(act.reshape(-1, site.width))
    assert relative(stats[site.tensor].augmented(), reference.augmented()) <= 1e-6
    assert relative(stats[site.tensor].covariance(), reference.covariance()) <= 1e-6


@pytest.mark.parametrize("hw", [12, 13])
@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample-grams", "rows"])
def test_spatial_stride_samples_every_sth_row_and_column(hw: int, per_sample: bool) -> None:
    model = offset_cnn(hw=hw, hidden=8)
    x = np.random.default_rng(3).standard_normal((10, 4, hw, hw)).astype(np.float32)
    sites, stats = measured(model, x, batch=4, strides={"conv1_out": 3}, per_sample=per_sample)
    site = next(s for s in sites if s.tensor == "conv1_out")
    reference = reference_stats(model, x, site, stride=3)
    assert stats[site.tensor].count == 10 * len(range(0, hw, 3)) ** 2
    assert relative(stats[site.tensor].augmented(), reference.augmented()) <= 1e-6


def expansion_cnn(hidden: int, hw: int = 32) -> onnx.ModelProto:
    """1x1 expansion (8 -> hidden) -> Relu -> 1x1 projection (hidden -> 8): the Gram of the hidden
    site costs hidden / 16 times the block's MACs per position."""
    rng = np.random.default_rng(4)
    g = GraphBuilder([None, 8, hw, hw])
    x = g.conv(g.input_name, rng.standard_normal((hidden, 8, 1, 1)).astype(np.float32) / 3, None, name="expand")
    x = g.op("Relu", [x])
    x = g.conv(x, rng.standard_normal((8, hidden, 1, 1)).astype(np.float32) / 8, None, name="project")
    x = g.op("GlobalAveragePool", [x])
    x = g.op("Flatten", [x])
    x = g.gemm(x, rng.standard_normal((8, 3)).astype(np.float32), None, name="fc")
    return g.build(x, ["N", 3])


def test_auto_strides_only_where_the_gram_would_be_expensive() -> None:
    x = np.zeros((1024, 8, 32, 32), np.float32)
    cheap = prepare(expansion_cnn(hidden=2), {"x": x}, verify_samples=0)
    assert set(cheap.strides.values()) == {1}
    wide = prepare(expansion_cnn(hidden=40), {"x": x}, verify_samples=0)
    hidden = next(s for s in wide.analysis.sites() if s.width == 40)
    assert wide.strides[hidden.tensor] > 1
    # the chosen strides bring the Gram work within a quarter of the model's MACs
    work = sum(np.prod(wide.shapes[s.tensor][2:]) / wide.strides[s.tensor] ** 2 * s.width ** 2 for s in wide.analysis.sites())
    assert work <= 0.25 * (32 * 32 * 8 * 40 * 2 + 8 * 3)
    assert set(prepare(expansion_cnn(hidden=40), {"x": x}, verify_samples=0, spatial_stride=1).strides.values()) == {1}
    # with fewer calibration samples the statistics keep more positions (>= ROWS_PER_UNIT = 1024 rows per unit)
    few = prepare(expansion_cnn(hidden=40), {"x": x[:256]}, verify_samples=0)
    assert few.strides[hidden.tensor] == 2  # stride 2: 256 x 16 x 16 rows >= 1024 x 40; stride 3 would leave 256 x 11 x 11 < 1024 x 40
    assert prepare(expansion_cnn(hidden=40), {"x": x[:128]}, verify_samples=0).strides[hidden.tensor] == 1


def test_strides_never_leave_fewer_than_two_positions_per_dim() -> None:
    site = Site("t", 1, 512)
    assert choose_strides([site], {"t": (1, 512, 5, 5)}, model_macs=1) == {"t": 2}
    assert choose_strides([site], {"t": (1, 512, 3, 3)}, model_macs=1) == {"t": 1}
    assert choose_strides([site], {"t": (1, 512, 64, 64)}, model_macs=1) == {"t": 4}
    assert choose_strides([site], {"t": (1, 512, 64, 64)}, model_macs=1, spatial_stride=9) == {"t": 4}
    token = Site("m", 2, 512)  # [N, T, D] MatMul input: tokens are never subsampled
    assert choose_strides([token], {"m": (1, 4096, 512)}, model_macs=1) == {"m": 1}


def test_prune_with_subsampled_statistics_reports_it_and_stays_faithful(monkeypatch) -> None:
    """Subsampled statistics are reported and still prune faithfully (the row floor lowered to
    64 per unit so that a small set is subsampled)."""
    monkeypatch.setattr(calibrate, "ROWS_PER_UNIT", 64)
    model = expansion_cnn(hidden=96)
    x = np.random.default_rng(5).standard_normal((96, 8, 32, 32)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.25)
    assert report.spatial_strides and max(report.spatial_strides.values()) > 1
    assert "--spatial-stride 1" in report.markdown()
    _, full = onnxprune.prune(model, {"x": x}, ratio=0.25, spatial_stride=1)
    assert full.spatial_strides == {}
    fresh = np.random.default_rng(6).standard_normal((16, 8, 32, 32)).astype(np.float32)
    reference = run(model, fresh)
    error = np.linalg.norm(run(pruned, fresh) - reference) / np.linalg.norm(reference)
    assert error < 0.05 and report.fidelity[0].relative_l2 < 0.05


def test_cli_spatial_stride_option(tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(expansion_cnn(hidden=96), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(7).standard_normal((64, 8, 32, 32)).astype(np.float32))
    code, _, err = cli([path, "--calib", tmp_path / "calib.npz", "--ratio", "0.25", "--spatial-stride", "0"], capsys)
    assert code == 2 and "--spatial-stride" in err and len(err.strip().splitlines()) == 1
    report = tmp_path / "r.json"
    code, _, err = cli([path, "--calib", tmp_path / "calib.npz", "--ratio", "0.25", "--spatial-stride", "2", "-q", "--report", report], capsys)
    assert code == 0, err
    assert set(json.loads(report.read_text())["spatial_strides"].values()) == {2}


def test_shards_record_their_strides_and_refuse_to_mix_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(calibrate, "ROWS_PER_UNIT", 64)  # a small set subsampled: the strides are what is tested
    model = expansion_cnn(hidden=96)
    x = {"x": np.random.default_rng(8).standard_normal((64, 8, 32, 32)).astype(np.float32)}
    options = dict(verify_samples=0, batch_size=16)
    single = calibration_statistics(prepare(model, x, **options))
    parts = [partial_statistics(model, x, (i, 2), options) for i in range(2)]
    merged = Statistics.merge_all(parts)
    assert merged.strides and max(merged.strides.values()) > 1
    for name, stats in single.items():
        np.testing.assert_allclose(merged.sites[name].gram, stats.gram, rtol=1e-12, atol=1e-9)
    path = tmp_path / "part.npz"
    parts[0].save(path)
    assert Statistics.load(path).strides == parts[0].strides
    other = partial_statistics(model, x, (1, 2), {**options, "spatial_stride": 1})
    with pytest.raises(onnxprune.OnnxPruneError, match="spatial strides"):
        parts[0].merge(other)


def test_large_models_keep_their_weights_on_disk_with_the_same_results(monkeypatch, tmp_path) -> None:
    """A large model's weights stay in a file (a temporary one for an in-memory model) that
    onnxruntime maps; the statistics, the pruned model and the fidelity are the same, the model
    proto comes back byte-identical and the temporary file is gone afterwards."""
    import tempfile

    model = expansion_cnn(hidden=40)
    x = {"x": np.random.default_rng(9).standard_normal((48, 8, 32, 32)).astype(np.float32)}
    in_memory, report = onnxprune.prune(model, x, ratio=0.25)
    treat_as_large(monkeypatch)
    before = model.SerializeToString()
    temporary = set(Path(tempfile.gettempdir()).glob("onnxprune-weights-*"))
    from_file, file_report = onnxprune.prune(model, x, ratio=0.25)
    assert from_file.SerializeToString() == in_memory.SerializeToString()
    assert file_report.fidelity == report.fidelity
    assert set(Path(tempfile.gettempdir()).glob("onnxprune-weights-*")) == temporary
    assert model.SerializeToString() == before
    patch, _ = onnxprune.calibrate.instrument(model, analyse(model).sites(), {s.tensor: 4 for s in analyse(model).sites()})
    onnxprune.calibrate.make_session(model, patch=patch)
    assert model.SerializeToString() == before
    # a model with external data is read where it is: the same result, its files unchanged
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the copy's weights out
    onnx.save_model(copy, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    data_before = (tmp_path / "m.data").read_bytes()
    from_external, _ = onnxprune.prune(tmp_path / "m.onnx", x, ratio=0.25)
    assert from_external.SerializeToString() == in_memory.SerializeToString()
    assert (tmp_path / "m.data").read_bytes() == data_before
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in from_external.graph.initializer)
    # a file with embedded weights: they go to a temporary file, removed afterwards
    onnx.save_model(model, str(tmp_path / "embedded.onnx"))
    from_embedded, _ = onnxprune.prune(tmp_path / "embedded.onnx", x, ratio=0.25)
    assert from_embedded.SerializeToString() == in_memory.SerializeToString()
    assert set(Path(tempfile.gettempdir()).glob("onnxprune-weights-*")) == temporary
    # shards of a model whose weights are on disk merge to statistics that apply to it
    options = dict(verify_samples=0, batch_size=16)
    merged = Statistics.merge_all([partial_statistics(tmp_path / "m.onnx", x, (i, 2), options) for i in range(2)])
    from_shards, _ = onnxprune.prune(tmp_path / "embedded.onnx", x, ratio=0.25, statistics=merged, **options)
    direct, _ = onnxprune.prune(model, x, ratio=0.25, **options)
    for a, b in zip(from_shards.graph.initializer, direct.graph.initializer, strict=True):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), rtol=1e-5, atol=1e-6)


def test_a_model_proto_with_unreadable_external_data_is_refused(tmp_path) -> None:
    model = expansion_cnn(hidden=8)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    x = {"x": np.zeros((8, 8, 32, 32), np.float32)}
    with pytest.raises(onnxprune.OnnxPruneError, match="external data 'm.data' that cannot be found"):
        onnxprune.prune(proto, x, ratio=0.25)


def test_a_full_temporary_folder_is_a_clear_error(monkeypatch) -> None:
    import errno

    import onnxprune.weights

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    treat_as_large(monkeypatch)
    monkeypatch.setattr(onnxprune.weights, "write_weights", no_room)
    x = {"x": np.zeros((16, 8, 32, 32), np.float32)}
    with pytest.raises(onnxprune.OnnxPruneError, match="No space left on device.*TMPDIR"):
        onnxprune.prune(expansion_cnn(hidden=8), x, ratio=0.25)


def _deconvolution_decoder() -> onnx.ModelProto:
    """ReLU -> ConvTranspose k2 s2 (2 -> 16 units, the Gram work 8x its MACs: subsampled; unit 15
    negative on tap (0, 0), which alone makes the even rows' even columns) -> ReLU -> 1x1 conv:
    unit 15 is silent on every even row and column and alive elsewhere."""
    rng = np.random.default_rng(2)
    g = GraphBuilder([None, 2, 6, 6])
    w = np.abs(rng.normal(size=(2, 16, 2, 2))).astype(np.float32)
    w[:, 15, 0, 0] *= -1
    up = g.op("ConvTranspose", [g.op("Relu", ["x"]), g.const(w), g.const(np.full(16, -0.05, np.float32))], name="up", kernel_shape=[2, 2],
              strides=[2, 2])
    return g.build(g.conv(g.op("Relu", [up]), rng.normal(size=(4, 16, 1, 1)).astype(np.float32), np.zeros(4, np.float32)), ["N", 4, 12, 12])


def test_a_deconvolution_map_is_never_subsampled_in_step_with_its_stride() -> None:
    """A spatial stride of 2 on the map of a stride-2 ConvTranspose reads one phase of it: a unit
    silent there looked dead and was removed. The auto stride skips strides that share a factor
    with the period (3 instead of 2), and nothing is removed."""
    from builders import relative_l2
    from onnxprune.calibrate import phase_periods

    model = _deconvolution_decoder()
    index = GraphIndex(model, static_shapes(model, {"x": (1, 2, 6, 6)}))
    up_site = next(s for s in analyse(model, index=index).sites() if s.width == 16)
    assert phase_periods(index, [up_site]) == {up_site.tensor: 2}
    assert choose_strides([up_site], index.shapes, 1, periods={up_site.tensor: 2}) == {up_site.tensor: 3}
    x = np.random.default_rng(3).normal(size=(64, 2, 6, 6)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    assert report.spatial_strides.get(up_site.tensor, 1) % 2  # was 2; 3 would leave too few rows here: 1
    assert {s.name: s.kept for s in report.spaces}["up"] == 16
    assert relative_l2(run(model, x[:8]), run(pruned, x[:8])) < 1e-5
