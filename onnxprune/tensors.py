"""Tensor values in memory or on disk: the pipeline's copy of a large model keeps its weights in
files (EXTERNAL tensors with an absolute `location`) and reads one when a stage needs it."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def is_on_disk(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_size(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)


@functools.cache
def item_size(data_type: int) -> int:
    """Bytes per element of an ONNX data type (0 for types without a NumPy counterpart)."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError):
        return 0


def data_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes the tensor's shape and type need (0 for types without a NumPy counterpart)."""
    return tensor_size(tensor) * item_size(tensor.data_type)


def location(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of an on-disk tensor."""
    fields = _external_fields(tensor)
    length = int(fields["length"]) if "length" in fields else data_bytes(tensor)
    return Path(fields["location"]), int(fields.get("offset", 0)), length


def read_raw(tensor: onnx.TensorProto) -> bytes:
    path, offset, length = location(tensor)
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def in_memory(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor itself, or an in-memory copy of an on-disk one."""
    if not is_on_disk(tensor):
        return tensor
    loaded = onnx.TensorProto()
    loaded.name, loaded.data_type = tensor.name, tensor.data_type
    loaded.dims.extend(tensor.dims)
    loaded.raw_data = read_raw(tensor)
    return loaded


def read_array(tensor: onnx.TensorProto) -> np.ndarray:
    """NumPy value of a tensor in memory or on disk (the tensor is not changed)."""
    return numpy_helper.to_array(in_memory(tensor))


def anchor(tensors: list[onnx.TensorProto], folder: Path) -> None:
    """Make the external-data locations of tensors read from a file absolute (they are resolved
    against the model's folder once, wherever the pipeline runs them later)."""
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = str((folder / entry.value).resolve())
