"""Issue 15: calibration sets are read one batch at a time. .npy files and stored .npz members
are read by offset, compressed members streamed, image folders decoded per batch and the
data-loader hook spooled to a temporary file; the batches equal what np.load gives, and a file
truncated under a run is a one-line CalibrationError."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxprune
import onnxprune.columns
from builders import random_cnn, random_mlp
from onnxprune.columns import FileColumn, MemoryColumn, StreamColumn, open_npy, open_npz
from onnxprune.data import CalibrationData, load_calibration
from onnxprune.errors import CalibrationError


def every_batch(data: CalibrationData, size: int) -> dict[str, np.ndarray]:
    parts = list(data.batches(size))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_npy_is_read_by_offset_batch_by_batch(tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_calibration(tmp_path / "x.npy", random_mlp(widths=(16, 8, 4)))
    column = data.columns["x"].column
    assert isinstance(column, FileColumn) and column.shape == (50, 16)
    assert np.array_equal(every_batch(data, 7)["x"], x)
    calib, verify = data.split(5)
    assert np.array_equal(verify.arrays["x"], x[45:]) and np.array_equal(calib.take(10, 12).arrays["x"], x[10:12])


@pytest.mark.parametrize("compress", [False, True])
def test_npz_members_are_read_per_batch_stored_by_offset_compressed_as_a_stream(tmp_path, compress: bool) -> None:
    rng = np.random.default_rng(1)
    x, extra = rng.standard_normal((40, 16)), rng.integers(0, 9, (40,))
    (np.savez_compressed if compress else np.savez)(tmp_path / "d.npz", x=x, labels=extra)
    columns = open_npz(tmp_path / "d.npz", "d.npz")
    assert isinstance(columns["x"], StreamColumn if compress else FileColumn)
    data = load_calibration(tmp_path / "d.npz", random_mlp(widths=(16, 8, 4)))  # float64 -> float32, checked per batch
    assert np.array_equal(every_batch(data, 6)["x"], x.astype(np.float32))
    assert any("cast from float64" in note for note in data.notes) and any("labels" in note for note in data.notes)
    # out of order: the verification tail, then the start again (a stream restarts)
    assert np.array_equal(data.take(35, 40).arrays["x"], x[35:].astype(np.float32))
    assert np.array_equal(data.take(0, 3).arrays["x"], x[:3].astype(np.float32))


def test_fortran_order_arrays_are_read_whole(tmp_path) -> None:
    x = np.asfortranarray(np.random.default_rng(2).standard_normal((30, 16)).astype(np.float32))
    np.save(tmp_path / "f.npy", x)
    np.savez_compressed(tmp_path / "f.npz", x=x)
    assert isinstance(open_npy(tmp_path / "f.npy", "f.npy"), MemoryColumn)
    assert np.array_equal(open_npz(tmp_path / "f.npz", "f.npz")["x"].read(0, 30), x)


def test_a_stream_skips_ahead_in_chunks(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnxprune.columns, "SKIP_CHUNK", 64 * 4 * 3)  # three rows at a time
    x = np.arange(100 * 64, dtype=np.float32).reshape(100, 64)
    np.savez_compressed(tmp_path / "s.npz", x=x)
    column = open_npz(tmp_path / "s.npz", "s.npz")["x"]
    assert np.array_equal(column.read(77, 80), x[77:80]) and np.array_equal(column.read(80, 200), x[80:])


def _cut(path: Path, keep: float) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_a_npy_truncated_while_it_is_read_is_one_clear_error(tmp_path) -> None:
    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_calibration(tmp_path / "x.npy", random_mlp(widths=(16, 8, 4)))
    batches = data.batches(8)
    assert np.array_equal(next(batches)["x"], x[:8])
    _cut(tmp_path / "x.npy", 0.5)
    with pytest.raises(CalibrationError, match=r"'.*x\.npy' is truncated"):
        list(batches)


@pytest.mark.parametrize("compress", [False, True])
def test_a_npz_truncated_while_it_is_read_is_one_clear_error(tmp_path, compress: bool) -> None:
    x = np.random.default_rng(4).standard_normal((256, 64)).astype(np.float32)
    (np.savez_compressed if compress else np.savez)(tmp_path / "d.npz", x=x)
    data = load_calibration(tmp_path / "d.npz", random_mlp(widths=(64, 8, 4)))
    batches = data.batches(16)
    next(batches)
    _cut(tmp_path / "d.npz", 0.4)
    with pytest.raises(CalibrationError, match=r"d\.npz"):
        list(batches)


def test_a_file_that_is_short_from_the_start_is_refused_before_reading(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((64, 16), np.float32))
    _cut(tmp_path / "x.npy", 0.6)
    with pytest.raises(CalibrationError, match="truncated"):
        load_calibration(tmp_path / "x.npy", random_mlp(widths=(16, 8, 4)))
    np.savez(tmp_path / "d.npz", x=np.zeros((64, 16), np.float32))
    with zipfile.ZipFile(tmp_path / "d.npz") as archive:
        assert archive.infolist()[0].compress_type == zipfile.ZIP_STORED
    _cut(tmp_path / "d.npz", 0.6)  # the zip directory at the end is gone
    with pytest.raises(CalibrationError, match=r"d\.npz' is not a readable"):
        load_calibration(tmp_path / "d.npz", random_mlp(widths=(16, 8, 4)))


def test_values_are_checked_batch_by_batch_with_the_same_messages(tmp_path) -> None:
    x = np.random.default_rng(5).standard_normal((40, 16)).astype(np.float32)
    x[33, 2] = np.nan
    np.save(tmp_path / "nan.npy", x)
    data = load_calibration(tmp_path / "nan.npy", random_mlp(widths=(16, 8, 4)))
    assert len(list(data.take(0, 30).batches(10))) == 3
    with pytest.raises(CalibrationError, match="'x' in '.*nan.npy' contains NaN or Inf"):
        list(data.batches(10))
    np.save(tmp_path / "huge.npy", np.full((8, 16), 1e300))
    with pytest.raises(CalibrationError, match="outside the range of the model's float32"):
        list(load_calibration(tmp_path / "huge.npy", random_mlp(widths=(16, 8, 4))).batches(4))


def test_image_folders_are_decoded_per_batch(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(6)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    model = random_cnn(channels=(3, 8, 6), hw=8, seed=1)
    data = load_calibration(tmp_path, model)
    column = data.columns["x"].column
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real(path, *a, **k))
    batch = data.take(4, 7).arrays["x"]
    monkeypatch.undo()
    assert opened == ["04.png", "05.png", "06.png"] and batch.shape == (3, 3, 8, 8)
    expected = np.asarray(Image.open(tmp_path / "05.png").convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    assert np.allclose(batch[1], expected) and column.shape == (12, 3, 8, 8)


def test_the_data_loader_is_consumed_as_a_generator_and_spooled(tmp_path, private_tmpdir) -> None:
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "SEEN = []\n"
        "def load_data():\n"
        "    rng = np.random.default_rng(7)\n"
        "    for i in range(9):\n"
        "        SEEN.append(i)\n"
        "        yield {'x': rng.standard_normal((5, 16)).astype(np.float32)}\n"
    )
    expected = np.concatenate([np.random.default_rng(7).standard_normal((5, 16)).astype(np.float32) for _ in range(1)])
    data = load_calibration(f"{script}:load_data", random_mlp(widths=(16, 8, 4)))
    assert data.n_samples == 45 and isinstance(data.columns["x"].column, FileColumn)
    assert np.array_equal(data.take(0, 5).arrays["x"], expected)
    spools = list(private_tmpdir.glob("onnxprune-calib-*"))
    assert len(spools) == 1 and spools[0].stat().st_size > 0
    limited = load_calibration(f"{script}:load_data", random_mlp(widths=(16, 8, 4)), limit=12)
    assert limited.n_samples == 12
    del data, limited
    import gc

    gc.collect()
    assert list(private_tmpdir.iterdir()) == []  # the spools go with their last reader


def test_data_loader_batches_must_agree(tmp_path, private_tmpdir) -> None:
    script = tmp_path / "uneven.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    yield {'x': np.zeros((4, 16), np.float32)}\n"
        "    yield {'x': np.zeros((4, 15), np.float32)}\n"
    )
    with pytest.raises(CalibrationError, match="different shapes.*'x'.*batch 2"):
        load_calibration(f"{script}:load_data", random_mlp(widths=(16, 8, 4)))


def test_pruning_from_a_file_equals_pruning_from_memory(tmp_path) -> None:
    model = random_cnn(channels=(3, 8, 6), hw=8, seed=1)
    x = np.random.default_rng(8).standard_normal((70, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez_compressed(tmp_path / "x.npz", x=x)
    reference, report = onnxprune.prune(model, {"x": x}, ratio=0.3, batch_size=16)
    for path in ("x.npy", "x.npz"):
        pruned, other = onnxprune.prune(model, tmp_path / path, ratio=0.3, batch_size=16)
        assert pruned.SerializeToString() == reference.SerializeToString(), path
        assert other.fidelity == report.fidelity
    onnx.checker.check_model(reference, full_check=True)
