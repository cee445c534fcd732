"""Calibration sources beyond .npz/.npy: a folder of images (decoded a batch at a time), or a
Python data-loader hook (polygraphy style) consumed as a generator and spooled to a temporary
file. Both give the same {input name: Column} as the array files."""

from __future__ import annotations

import importlib.util
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import tempfiles
from .columns import Column, FileColumn
from .errors import CalibrationError, ResourceError
from .inputs import input_specs

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class ImageOptions:
    """How images become a model input: resize to (H, W), x * scale, then (x - mean) / std per channel."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None
    scale: float = 1 / 255


def _image_layout(dims: tuple[int | None, ...], wanted: str | None) -> str:
    if wanted:
        if wanted not in ("NCHW", "NHWC"):
            raise CalibrationError(f"--layout must be NCHW or NHWC, got '{wanted}'")
        return wanted
    if dims[1] in (1, 3) and dims[-1] not in (1, 3):
        return "NCHW"
    if dims[-1] in (1, 3):
        return "NHWC"
    return "NCHW"


@dataclass
class ImageColumn:
    """Image files decoded with Pillow when their samples are read: resized, x * scale, then
    (x - mean) / std per channel, in the model's layout and dtype."""

    files: list[Path]
    height: int
    width: int
    channels: int
    layout: str
    mean: np.ndarray
    std: np.ndarray
    scale: float
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        n, c, h, w = len(self.files), self.channels, self.height, self.width
        return (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)

    def read(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        files = self.files[start:stop]
        images = np.empty((len(files), self.height, self.width, self.channels), dtype=np.float32)
        for i, path in enumerate(files):
            try:
                with Image.open(path) as image:
                    image = image.convert("L" if self.channels == 1 else "RGB").resize((self.width, self.height), Image.Resampling.BILINEAR)
                    images[i] = np.asarray(image, dtype=np.float32).reshape(self.height, self.width, self.channels)
            except (UnidentifiedImageError, OSError) as exc:
                raise CalibrationError(f"cannot decode image '{path}': {exc}") from None
        images = (images * self.scale - self.mean) / self.std
        if self.layout == "NCHW":
            images = images.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(images.astype(self.dtype))


def load_image_folder(folder: Path, model: onnx.ModelProto, options: ImageOptions, limit: int | None = None) -> dict[str, Column]:
    """The images in `folder` (sorted by name) as the model's one 4-D input, decoded per batch;
    the first is decoded now, so that a folder of broken files fails at once."""
    specs = input_specs(model)
    if len(specs) != 1 or len(specs[0].dims) != 4:
        raise CalibrationError(f"an image folder calibrates models with one 4-D input; this model has inputs {[s.name for s in specs]}")
    spec = specs[0]
    layout = _image_layout(spec.dims, options.layout)
    channels, height, width = (spec.dims[1], spec.dims[2], spec.dims[3]) if layout == "NCHW" else (spec.dims[3], spec.dims[1], spec.dims[2])
    if options.size is not None:
        height, width = options.size
    if height is None or width is None:
        raise CalibrationError(f"input '{spec.name}' has a dynamic image size; give --input-size H,W")
    channels = channels or 3
    if channels not in (1, 3):
        raise CalibrationError(f"input '{spec.name}' has {channels} channels; image folders give 1 (grey) or 3 (RGB)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"folder '{folder}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = files[:limit] if limit else files
    mean = _per_channel(options.mean, channels, "--mean")
    std = _per_channel(options.std, channels, "--std")
    if np.any(std == 0):
        raise CalibrationError("--std must not contain 0")
    column = ImageColumn(files, height, width, channels, layout, mean, std, options.scale, spec.dtype)
    column.read(0, 1)
    return {spec.name: column}


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise CalibrationError(f"{flag} has {len(values)} values; the model's images have {channels} channels")
    return np.asarray(values, dtype=np.float32)


class Spool:
    """A temporary folder with the samples a data-loader yielded, one raw file per input; removed
    when the last column reading it is gone (a copy sent to another process never removes it)."""

    def __init__(self) -> None:
        self.folder = tempfiles.make_folder("onnxprune-calib")
        self._cleanup = weakref.finalize(self, tempfiles.remove, self.folder)

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.folder, self._cleanup = state["folder"], None


class _SpoolWriter:
    """Appends each input's samples to its file; the first batch fixes the inputs, dtypes and
    sample shapes that later batches must have."""

    def __init__(self, spec: str) -> None:
        self.spec, self.spool = spec, Spool()
        self.layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.rows: dict[str, int] = {}
        self.batches = 0

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Write one batch; returns its sample count (that of its first input)."""
        if not self.layout:
            self.layout = {k: (v.dtype, v.shape[1:]) for k, v in batch.items()}
        if set(batch) != set(self.layout):
            raise CalibrationError(f"data-loader '{self.spec}' yielded batches with different inputs: {sorted(batch)} after {sorted(self.layout)}")
        for key, value in batch.items():
            dtype, shape = self.layout[key]
            if value.shape[1:] != shape:
                raise CalibrationError(f"data-loader '{self.spec}' yielded batches of different shapes: input '{key}' has samples of shape "
                                       f"{value.shape[1:]} in batch {self.batches + 1}, {shape} in batch 1")
            if value.dtype != dtype:
                if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                    raise CalibrationError(f"data-loader '{self.spec}' yielded input '{key}' as {value.dtype} in batch {self.batches + 1}, {dtype} in batch 1")
                value = value.astype(dtype)
            try:
                with open(self._file(key), "ab") as handle:
                    handle.write(np.ascontiguousarray(value).tobytes())
            except OSError as exc:
                raise ResourceError(f"cannot write the calibration samples of '{self.spec}' to '{self.spool.folder}': "
                                    f"{exc.strerror or exc} (set TMPDIR to a folder with room for them)") from None
            self.rows[key] = self.rows.get(key, 0) + len(value)
        self.batches += 1
        return len(next(iter(batch.values())))

    def _file(self, key: str) -> Path:
        return self.spool.folder / f"{list(self.layout).index(key)}.bin"

    def columns(self, limit: int | None) -> dict[str, Column]:
        return {key: FileColumn(self._file(key), 0, (min(rows, limit) if limit else rows, *self.layout[key][1]),
                                self.layout[key][0], self.spec, owner=self.spool)
                for key, rows in self.rows.items()}


def _import_loader(spec: str):
    """The function named by `file.py:function` (default `load_data`), imported from the user's file."""
    path_text, _, function = spec.rpartition(":")
    if not path_text or not function:
        path_text, function = spec, "load_data"
    path = Path(path_text)
    if not path.is_file():
        raise CalibrationError(f"data-loader script '{path}' does not exist")
    module_spec = importlib.util.spec_from_file_location(f"onnxprune_loader_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's script: report it in one line
        raise CalibrationError(f"data-loader script '{path}' failed to import: {type(exc).__name__}: {exc}") from None
    loader = getattr(module, function, None)
    if not callable(loader):
        raise CalibrationError(f"data-loader script '{path}' has no function '{function}'")
    return loader


def load_loader_script(spec: str, limit: int | None = None) -> dict[str, Column]:
    """Run `file.py:function` (the user's own code) and spool the {name: array} batches it yields
    to a temporary file one at a time (at most `limit` samples)."""
    loader = _import_loader(spec)
    writer = _SpoolWriter(spec)
    count = 0
    try:
        batches: Iterable = loader()
        for batch in batches:
            if not isinstance(batch, dict) or not batch:
                raise CalibrationError(f"'{spec}' must yield dicts {{input name: array}}, got {type(batch).__name__}")
            arrays = {}
            for key, value in batch.items():
                value = np.asarray(value)
                arrays[key] = value if value.ndim else value[None]
            count += writer.add(arrays)
            if limit and count >= limit:
                break
    except (CalibrationError, ResourceError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"data-loader '{spec}' raised {type(exc).__name__}: {exc}") from None
    if not writer.rows:
        raise CalibrationError(f"data-loader '{spec}' yielded no batches")
    return writer.columns(limit)
