"""Calibration data: open .npz/.npy files and the other sources, check them against the model's
inputs, split and batch them. Samples are read one batch at a time (`columns`), so memory does
not grow with the size of the calibration set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .columns import Column, MemoryColumn, open_npy, open_npz, row_bytes
from .errors import CalibrationError
from .inputs import InputSpec, input_specs
from .sources import ImageOptions, load_image_folder, load_loader_script


@dataclass
class CalibrationData:
    """One column per graph input and the range [start, stop) of samples in use; axis 0 is the
    sample axis, the same length for every input. Arrays given directly are kept in memory."""

    columns: dict[str, Column | np.ndarray]
    source: str = "<arrays>"
    notes: list[str] = field(default_factory=list)
    start: int = 0
    stop: int | None = None

    def __post_init__(self) -> None:
        self.columns = {k: MemoryColumn(v) if isinstance(v, np.ndarray) else v for k, v in self.columns.items()}
        if self.stop is None:
            self.stop = next(iter(self.columns.values())).shape[0]

    @property
    def n_samples(self) -> int:
        return self.stop - self.start

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every sample in use, read into memory (for small sets; the pipeline reads batches)."""
        return self.read(0, self.n_samples)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples [start, stop) of this range, one array per input."""
        begin, end = self.start + start, min(self.start + stop, self.stop)
        return {k: column.read(begin, end) for k, column in self.columns.items()}

    def take(self, start: int, stop: int) -> CalibrationData:
        begin, end = self.start + start, min(self.start + stop, self.stop)
        return CalibrationData(self.columns, self.source, self.notes, begin, max(begin, end))

    def split(self, n_verify: int) -> tuple[CalibrationData, CalibrationData]:
        """(calibration, verification): the last `n_verify` samples are held out."""
        cut = self.n_samples - n_verify
        return self.take(0, cut), self.take(cut, self.n_samples)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.n_samples, batch_size):
            yield self.read(start, start + batch_size)

    def spread_starts(self, samples: int, batch_size: int) -> np.ndarray | None:
        """Where `spread_batches` starts its batches (None: it takes every batch)."""
        count = -(-samples // batch_size)
        if samples <= 0 or count * batch_size >= self.n_samples:
            return None
        return np.linspace(0, self.n_samples - batch_size, count).round().astype(np.int64)

    def spread_batches(self, samples: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Whole batches of about `samples` samples in all, spread evenly over the range (every
        batch when `samples` covers it): a subset that is not the first classes of a sorted set."""
        starts = self.spread_starts(samples, batch_size)
        if starts is None:
            yield from self.batches(batch_size)
            return
        for start in starts:
            yield self.read(int(start), int(start) + batch_size)

    def outside_spread(self, samples: int, batch_size: int, limit: int, least: int = 1) -> CalibrationData | None:
        """Up to `limit` of the samples that `spread_batches(samples, batch_size)` leaves out,
        spread over them and read into memory (None: it leaves fewer than `least` out, nothing read)."""
        starts = self.spread_starts(samples, batch_size)
        if starts is None:
            return None
        taken = np.zeros(self.n_samples, bool)
        for start in starts:
            taken[start:start + batch_size] = True
        left = np.flatnonzero(~taken)
        if len(left) < max(least, 1):
            return None
        chosen = np.unique(left[np.linspace(0, len(left) - 1, min(limit, len(left))).round().astype(np.int64)])
        runs = np.split(chosen, np.flatnonzero(np.diff(chosen) > 1) + 1)  # consecutive samples are read together
        parts = [self.read(int(run[0]), int(run[-1]) + 1) for run in runs]
        arrays = {name: np.concatenate([part[name] for part in parts]) for name in self.columns}
        return CalibrationData(arrays, self.source, self.notes)

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample over every input."""
        return sum(row_bytes(column.shape, np.dtype(column.dtype)) for column in self.columns.values())

    def sample_shapes(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """Shape of one batch of each input (a model with a fixed batch size runs only that)."""
        return {k: (batch, *column.shape[1:]) for k, column in self.columns.items()}


@dataclass
class CheckedColumn:
    """A column whose samples are checked and cast to the model's dtype as they are read (NaN,
    Inf and values out of the model dtype's range are refused batch by batch)."""

    column: Column
    spec: InputSpec
    source: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.column.shape

    @property
    def dtype(self) -> np.dtype:
        return self.spec.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return checked_values(self.column.read(start, stop), self.spec, self.source)


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def load_arrays(path: str | Path) -> dict[str, Column]:
    """Open a .npz (one array per input) or a bare .npy (key ''); nothing is read beyond the
    headers yet, and pickled objects are refused, never run."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file '{path}' does not exist")
    if path.is_dir():
        raise CalibrationError(f"calibration path '{path}' is a folder; expected a .npz or .npy file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration file '{path}': {exc.strerror or exc}") from None
    if not (magic.startswith(ZIP_MAGIC) or magic == NPY_MAGIC):
        raise CalibrationError(f"calibration file '{path}' is not a .npz or .npy file (no numpy or zip header)")
    return {"": open_npy(path, str(path))} if magic == NPY_MAGIC else open_npz(path, str(path))


def checked_values(array: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    """The samples cast to the model's dtype; NaN, Inf and values the cast would change are refused."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' contains NaN or Inf values")
    if array.dtype == spec.dtype:
        return array
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(spec.dtype)
    if spec.dtype.kind == "f" and not np.isfinite(cast).all():
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has values outside the range of the model's {spec.dtype}")
    if spec.dtype.kind in "iu" and not np.array_equal(cast.astype(array.dtype), array):
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has values outside the range of the model's {spec.dtype}")
    return cast


def _as_column(value, name: str, source: str) -> Column:
    if isinstance(value, np.ndarray):
        return MemoryColumn(value)
    if hasattr(value, "read") and hasattr(value, "shape"):
        return value
    try:
        return MemoryColumn(np.asarray(value))
    except ValueError:
        raise CalibrationError(f"calibration input '{name}' in '{source}' is not a rectangular array") from None


def _check_column(column: Column, spec: InputSpec, source: str) -> Column:
    """Dtype and shape against the input's; values now for arrays in memory, else per batch."""
    dtype, shape = np.dtype(column.dtype), tuple(column.shape)
    if dtype.kind not in "biuf":
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has dtype {dtype}; expected numbers ({spec.dtype})")
    if len(shape) != len(spec.dims):
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has rank {len(shape)} {shape}; the model expects rank {len(spec.dims)} {_dims_text(spec.dims)}")
    for axis, (got, want) in enumerate(zip(shape[1:], spec.dims[1:], strict=False), start=1):
        if want is not None and got != want:
            raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has size {got} on axis {axis}; the model expects {want} {_dims_text(spec.dims)}")
    if dtype != spec.dtype and not np.can_cast(dtype, spec.dtype, casting="same_kind"):
        raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has dtype {dtype}, which cannot be cast safely to the model's {spec.dtype}")
    if isinstance(column, MemoryColumn):
        return MemoryColumn(checked_values(column.array, spec, source))
    return CheckedColumn(column, spec, source)


def check_calibration(arrays: dict, model: onnx.ModelProto, source: str, limit: int | None = None) -> CalibrationData:
    """Match columns (or arrays) to graph inputs by name, cast safely, and refuse what cannot be
    right; at most `limit` samples are used."""
    specs = input_specs(model)
    if "" in arrays:  # bare .npy
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise CalibrationError(f"'{source}' is a bare array but the model has {len(specs)} inputs ({names}); use a .npz keyed by input name")
        arrays = {specs[0].name: arrays[""]}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(f"calibration file '{source}' has no array for model input '{missing[0]}' (keys: {', '.join(sorted(arrays)) or 'none'})")
    notes = [f"calibration file '{source}' has arrays the model does not use: {', '.join(sorted(extra))}"
             for extra in [set(arrays) - {s.name for s in specs}] if extra]
    checked: dict[str, Column] = {}
    for spec in specs:
        column = _as_column(arrays[spec.name], spec.name, source)
        checked[spec.name] = _check_column(column, spec, source)
        if np.dtype(column.dtype) != spec.dtype:
            notes.append(f"calibration input '{spec.name}' cast from {np.dtype(column.dtype)} to the model's {spec.dtype}")
    counts = {c.shape[0] for c in checked.values()}
    if len(counts) != 1:
        raise CalibrationError(f"calibration inputs in '{source}' have different sample counts: {sorted(counts)}")
    count = counts.pop()
    if min(count, limit or count) < 2:
        raise CalibrationError(f"calibration file '{source}' needs at least 2 samples")
    data = CalibrationData(checked, source, notes)
    return data.take(0, limit) if limit else data


def load_calibration(
    calib: str | Path | dict[str, np.ndarray] | CalibrationData,
    model: onnx.ModelProto,
    image_options: ImageOptions | None = None,
    limit: int | None = None,
) -> CalibrationData:
    """Accept a .npz/.npy path, a folder of images, a `loader.py:function` hook, a dict of arrays
    or CalibrationData; return checked CalibrationData (at most `limit` samples)."""
    if limit is not None and limit < 2:
        raise CalibrationError(f"--calib-samples must be at least 2, got {limit}")
    if isinstance(calib, CalibrationData):  # a range of a larger set comes as its samples, in memory
        whole = calib.start == 0 and calib.stop == next(iter(calib.columns.values())).shape[0]
        arrays, source = calib.columns if whole else calib.arrays, calib.source
    elif isinstance(calib, dict):
        arrays, source = calib, "<arrays>"
    elif str(calib).partition(":")[0].endswith(".py") or str(calib).endswith(".py"):
        arrays, source = load_loader_script(str(calib), limit), str(calib)
    elif Path(calib).is_dir():
        arrays, source = load_image_folder(Path(calib), model, image_options or ImageOptions(), limit), str(calib)
    else:
        arrays, source = load_arrays(calib), str(calib)
    return check_calibration(arrays, model, source, limit)


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
