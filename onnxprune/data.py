"""Calibration data: load .npz/.npy, check it against the model's inputs, split and batch it."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import CalibrationError


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


@dataclass
class CalibrationData:
    """One array per graph input; axis 0 is the sample axis, the same length for every input."""

    arrays: dict[str, np.ndarray]
    source: str = "<arrays>"
    notes: list[str] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, start: int, stop: int) -> CalibrationData:
        return CalibrationData({k: v[start:stop] for k, v in self.arrays.items()}, self.source, self.notes)

    def split(self, n_verify: int) -> tuple[CalibrationData, CalibrationData]:
        """(calibration, verification): the last `n_verify` samples are held out."""
        cut = self.n_samples - n_verify
        return self.take(0, cut), self.take(cut, self.n_samples)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.n_samples, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one sample of each input, with a batch of 1."""
        return {k: (1, *v.shape[1:]) for k, v in self.arrays.items()}


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .npz (one array per input) or a bare .npy; pickled objects are refused, never run."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration file '{path}' does not exist")
    if path.is_dir():
        raise CalibrationError(f"calibration path '{path}' is a folder; expected a .npz or .npy file")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if not (magic.startswith(ZIP_MAGIC) or magic == NPY_MAGIC):
        raise CalibrationError(f"calibration file '{path}' is not a .npz or .npy file (no numpy or zip header)")
    try:
        if magic == NPY_MAGIC:
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as loaded:
            return {k: loaded[k] for k in loaded.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise CalibrationError(f"calibration file '{path}' holds pickled Python objects; only numeric arrays are read") from None
        raise CalibrationError(f"calibration file '{path}' is not a readable .npz/.npy file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"calibration file '{path}' is not a readable .npz/.npy file ({exc})") from None


def check_calibration(arrays: dict[str, np.ndarray], model: onnx.ModelProto, source: str) -> CalibrationData:
    """Match arrays to graph inputs by name, cast safely, and refuse what cannot be right."""
    specs = input_specs(model)
    if "" in arrays:  # bare .npy
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise CalibrationError(f"'{source}' is a bare array but the model has {len(specs)} inputs ({names}); use a .npz keyed by input name")
        arrays = {specs[0].name: arrays[""]}
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(f"calibration file '{source}' has no array for model input '{missing[0]}' (keys: {', '.join(sorted(arrays)) or 'none'})")
    checked: dict[str, np.ndarray] = {}
    notes = [f"calibration file '{source}' has arrays the model does not use: {', '.join(sorted(extra))}"
             for extra in [set(arrays) - {s.name for s in specs}] if extra]
    for spec in specs:
        array = arrays[spec.name]
        if not isinstance(array, np.ndarray):
            try:
                array = np.asarray(array)
            except ValueError:
                raise CalibrationError(f"calibration input '{spec.name}' in '{source}' is not a rectangular array") from None
        if array.dtype.kind not in "biuf":
            raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has dtype {array.dtype}; expected numbers ({spec.dtype})")
        if array.ndim != len(spec.dims):
            raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has rank {array.ndim} {tuple(array.shape)}; the model expects rank {len(spec.dims)} {_dims_text(spec.dims)}")
        for axis, (got, want) in enumerate(zip(array.shape[1:], spec.dims[1:], strict=False), start=1):
            if want is not None and got != want:
                raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has size {got} on axis {axis}; the model expects {want} {_dims_text(spec.dims)}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CalibrationError(f"calibration input '{spec.name}' in '{source}' contains NaN or Inf values")
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has dtype {array.dtype}, which cannot be cast safely to the model's {spec.dtype}")
            notes.append(f"calibration input '{spec.name}' cast from {array.dtype} to the model's {spec.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = array.astype(spec.dtype)
            if spec.dtype.kind == "f" and not np.isfinite(cast).all():
                raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has values outside the range of the model's {spec.dtype}")
            if spec.dtype.kind in "iu" and not np.array_equal(cast.astype(array.dtype), array):
                raise CalibrationError(f"calibration input '{spec.name}' in '{source}' has values outside the range of the model's {spec.dtype}")
            array = cast
        checked[spec.name] = array
    counts = {len(a) for a in checked.values()}
    if len(counts) != 1:
        raise CalibrationError(f"calibration inputs in '{source}' have different sample counts: {sorted(counts)}")
    if counts.pop() < 2:
        raise CalibrationError(f"calibration file '{source}' needs at least 2 samples")
    return CalibrationData(checked, source, notes)


def load_calibration(
    calib: str | Path | dict[str, np.ndarray] | CalibrationData,
    model: onnx.ModelProto,
    image_options=None,
    limit: int | None = None,
) -> CalibrationData:
    """Accept a .npz/.npy path, a folder of images, a `loader.py:function` hook, a dict of arrays
    or CalibrationData; return checked CalibrationData (at most `limit` samples)."""
    from .sources import ImageOptions, load_image_folder, load_loader_script

    if isinstance(calib, CalibrationData):
        arrays, source = calib.arrays, calib.source
    elif isinstance(calib, dict):
        arrays, source = calib, "<arrays>"
    elif str(calib).partition(":")[0].endswith(".py") or str(calib).endswith(".py"):
        arrays, source = load_loader_script(str(calib), limit), str(calib)
    elif Path(calib).is_dir():
        arrays, source = load_image_folder(Path(calib), model, image_options or ImageOptions(), limit), str(calib)
    else:
        arrays, source = load_arrays(calib), str(calib)
    if limit:
        if limit < 2:
            raise CalibrationError(f"--calib-samples must be at least 2, got {limit}")
        arrays = {k: v[:limit] for k, v in arrays.items()}
    return check_calibration(arrays, model, source)


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
