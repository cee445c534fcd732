"""Reading the user's model and writing ours: never modify the input, write atomically."""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from .errors import ModelError
from .graph import copy_model, tensor_size, weightless_skeleton


def load_model(source: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """(model, a name for messages). A ModelProto is copied so the caller's object is never changed."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        name = "<ModelProto>"
    else:
        path = Path(source)
        name = str(path)
        if not path.exists():
            raise ModelError(f"model file '{path}' does not exist")
        if path.is_dir():
            raise ModelError(f"model path '{path}' is a folder, not an .onnx file")
        try:
            model = onnx.load_model(str(path), load_external_data=False)
            check_external_data(model, path)
            if any(external_tensors(model)):
                load_external_data_for_model(model, str(path.parent))
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"'{path}' is not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        except OSError as exc:
            raise ModelError(f"cannot read model file '{path}': {exc.strerror or exc}") from None
    if not model.graph.node:
        raise ModelError(f"'{name}' is not an ONNX model with a graph (no nodes found)")
    problem = checker_problem(model)
    if problem:
        raise ModelError(f"'{name}' fails onnx.checker: {problem}")
    return model, name


def checker_problem(model: onnx.ModelProto, full_check: bool = False) -> str | None:
    """What onnx.checker finds wrong, or None. The graph is checked on its weightless skeleton (a
    serialised copy of a large model would double the memory), the weights' byte counts here."""
    try:
        onnx.checker.check_model(weightless_skeleton(model, {}), full_check=full_check)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, InferenceError and others
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for tensor in model.graph.initializer:
        expected = _tensor_bytes(tensor)
        if tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
            return f"initializer '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape needs {expected}"
    return None


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes the tensor's shape and type need (0 for types without a NumPy counterpart)."""
    try:
        return tensor_size(tensor) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError):
        return 0


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node tensors whose data lives in external files."""
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t") and uses_external_data(a.t)]
    return tensors


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations that escape the model's folder (absolute paths, '..', links)."""
    folder = path.resolve().parent
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or (target != folder and folder not in target.parents):
            raise ModelError(f"'{path}': tensor '{tensor.name}' points at external data '{location}' outside the model's folder; refusing to read it")
        if not target.is_file():
            raise ModelError(f"'{path}': external data file '{location}' of tensor '{tensor.name}' is missing")


def default_output_path(model_path: str | Path) -> Path:
    """MODEL.onnx -> MODEL.pruned.onnx"""
    path = Path(model_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.pruned.onnx")


PROTOBUF_LIMIT = 2**31 - 1  # a serialised ModelProto must stay below 2 GiB
SESSION_FROM_FILE = 64 * 2**20  # bigger models reach onnxruntime as a file with external data


def needs_external_data(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """True when the model cannot be serialised as one protobuf (tests lower PROTOBUF_LIMIT)."""
    return model.ByteSize() >= (PROTOBUF_LIMIT if limit is None else limit)


def save_model_atomic(model: onnx.ModelProto, path: str | Path, external_limit: int | None = None) -> None:
    """Write into a private temporary folder next to the target, then rename into place.

    Models at or over `external_limit` bytes are written with their weights in `<name>.data`
    beside the model (the ONNX external-data format)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise ModelError(f"output folder '{folder}' is not writable")
    if path.is_dir():
        raise ModelError(f"output '{path}' is a folder, not a file name")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as exc:
        raise ModelError(f"cannot write to output folder '{folder}': {exc.strerror or exc}") from None
    try:
        staged = staging / path.name
        if needs_external_data(model, external_limit):
            data_name = f"{path.name}.data"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            _fsync(staging / data_name)
            os.replace(staging / data_name, folder / data_name)
        else:
            staged.write_bytes(model.SerializeToString())
        _fsync(staged)
        os.replace(staged, path)
    except OSError as exc:
        raise ModelError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


EXTERNAL_MIN_BYTES = 1024  # tensors from this size on go to the external file
PAGE = 4096  # offsets in the external file are page-aligned, so onnxruntime can map them


@contextmanager
def weights_in_file(model: onnx.ModelProto, drop_outputs: bool = False):
    """A private temporary folder with the model's large tensors in `weights.bin`, and a small
    copy of the model whose tensors refer to that file; yields (folder, copy). The model itself
    is not touched: its protobuf arena would keep the memory of any field cleared and set again.

    onnxruntime builds a session from a file with external data holding about one copy of the
    weights; from serialised bytes it holds about three. `drop_outputs` leaves the graph outputs
    out of the copy (an instrumentation patch brings its own)."""
    small = copy_model(model, skip_graph=("initializer", "output") if drop_outputs else ("initializer",))
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as folder, open(Path(folder) / "weights.bin", "wb") as data:
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and _tensor_bytes(tensor) >= EXTERNAL_MIN_BYTES:
                raw = tensor.raw_data
                offset = -(-data.tell() // PAGE) * PAGE
                data.seek(offset)
                data.write(raw)
                ref = small.graph.initializer.add()
                ref.name, ref.data_type = tensor.name, tensor.data_type
                ref.dims.extend(tensor.dims)
                ref.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = ref.external_data.add()
                    entry.key, entry.value = key, value
                del raw
            else:
                small.graph.initializer.append(tensor)
        data.close()
        yield Path(folder), small


def release_memory(model: onnx.ModelProto) -> None:
    """For a large model, hand freed heap pages back to the OS: glibc keeps them otherwise, and a
    finished onnxruntime session's memory would stay counted until the process ends."""
    if model.ByteSize() < SESSION_FROM_FILE:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
