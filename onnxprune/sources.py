"""Calibration sources beyond .npz/.npy: a folder of images, or a Python data-loader hook
(polygraphy style). All of them produce the same {input name: array} dict."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .data import input_specs
from .errors import CalibrationError

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


def load_image_folder(folder: Path, model: onnx.ModelProto, options: ImageOptions, limit: int | None = None) -> dict[str, np.ndarray]:
    """Decode every image in `folder` (sorted by name) with Pillow into one input batch."""
    from PIL import Image, UnidentifiedImageError

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
    images = np.empty((len(files), height, width, channels), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.Resampling.BILINEAR)
                images[i] = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
        except (UnidentifiedImageError, OSError) as exc:
            raise CalibrationError(f"cannot decode image '{path}': {exc}") from None
    images = (images * options.scale - mean) / std
    if layout == "NCHW":
        images = images.transpose(0, 3, 1, 2)
    return {spec.name: np.ascontiguousarray(images.astype(spec.dtype))}


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise CalibrationError(f"{flag} has {len(values)} values; the model's images have {channels} channels")
    return np.asarray(values, dtype=np.float32)


def load_loader_script(spec: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """Run `file.py:function` (the user's own code) and stack the {name: array} batches it yields."""
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
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    try:
        batches: Iterable = loader()
        for batch in batches:
            if not isinstance(batch, dict) or not batch:
                raise CalibrationError(f"'{spec}' must yield dicts {{input name: array}}, got {type(batch).__name__}")
            arrays = {k: np.asarray(v) for k, v in batch.items()}
            for key, value in arrays.items():
                parts.setdefault(key, []).append(value if value.ndim else value[None])
            count += len(next(iter(arrays.values())))
            if limit and count >= limit:
                break
    except CalibrationError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CalibrationError(f"data-loader '{spec}' raised {type(exc).__name__}: {exc}") from None
    if not parts:
        raise CalibrationError(f"data-loader '{spec}' yielded no batches")
    try:
        stacked = {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError as exc:
        raise CalibrationError(f"data-loader '{spec}' yielded batches of different shapes: {exc}") from None
    return {k: v[:limit] if limit else v for k, v in stacked.items()}
