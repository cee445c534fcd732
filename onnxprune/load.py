"""Reading the user's model and writing ours: never modify the input, write atomically."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from . import tempfiles
from .errors import ModelError, ResourceError
from .graph import copy_model, default_opset, weightless_skeleton
from .interrupts import deferred
from .ops import STANDARD_DOMAINS
from .tensors import anchor, data_bytes, is_on_disk, location
from .tidy import tidy
from .weights import LARGE_MODEL, WeightsFile, model_bytes, offload, with_weights_in_memory, write_weights


def load_model(source: str | Path | onnx.ModelProto, offload_weights: bool = False) -> tuple[onnx.ModelProto, str, WeightsFile | None, list[str]]:
    """(model, a name for messages, the temporary file of its weights, notes on what `tidy`
    changed that the user sees). A ModelProto is copied so the caller's object is never changed. Initializers in external-data files stay there; with
    `offload_weights`, so do a large model's embedded ones, moved to a temporary file."""
    weights = None
    if isinstance(source, onnx.ModelProto):
        name = "<ModelProto>"
        model, weights = offload(source) if offload_weights else (source, None)
        if model is source:  # a large model's offloaded copy holds references, not a second copy of its weights
            model = onnx.ModelProto()
            model.CopyFrom(source)
        notes = tidy(model)
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
            # initializers stay in their external files (read when needed); Constant nodes' tensors are loaded
            anchor([t for t in model.graph.initializer if uses_external_data(t)], path.parent)
            for tensor in constant_node_tensors(model):
                if uses_external_data(tensor):
                    load_external_data_for_tensor(tensor, str(path.parent))
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
            notes = tidy(model)
            if offload_weights:
                model, weights = offload(model)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"'{path}' is not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        except OSError as exc:
            raise ModelError(f"cannot read model file '{path}': {exc.strerror or exc}") from None
    if not model.graph.node:
        raise ModelError(f"'{name}' is not an ONNX model with a graph (no nodes found)")
    problem = checker_problem(model)
    if problem:
        raise ModelError(f"'{name}' fails onnx.checker: {problem}")
    return model, name, weights, notes


# ops onnxruntime registers in the standard domain that ONNX lacks at some or all opsets (its
# optimizer writes SimplifiedLayerNormalization there; LayerNormalization before opset 17; the
# experimental ops ONNX removed): onnx.checker knows no schema for them, onnxruntime runs them
ORT_STANDARD_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization", "LayerNormalization", "Affine", "Crop", "ParametricSoftplus",
                                     "ImageScaler", "ThresholdedRelu", "DynamicSlice", "ScaledTanh", "MVN", "GivenTensorFill", "Scale"})


def _checkable_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The weightless skeleton, with onnxruntime's own standard-domain ops that ONNX has no schema
    for at the model's opset moved to onnxruntime's domain (the checker skips their schema)."""
    skeleton = weightless_skeleton(model, {})
    opset = default_opset(model) or 1
    moved = False
    for node in skeleton.graph.node:
        if node.domain in STANDARD_DOMAINS and node.op_type in ORT_STANDARD_DOMAIN_OPS and not onnx.defs.has(node.op_type, opset):
            node.domain, moved = "com.microsoft", True
    if moved and not any(o.domain == "com.microsoft" for o in skeleton.opset_import):
        skeleton.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return skeleton


def checker_problem(model: onnx.ModelProto, full_check: bool = False) -> str | None:
    """What onnx.checker finds wrong, or None. The graph is checked on its weightless skeleton (a
    serialised copy of a large model would double the memory), the weights' byte counts here."""
    try:
        onnx.checker.check_model(_checkable_skeleton(model), full_check=full_check)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, InferenceError and others
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for tensor in model.graph.initializer:
        expected = data_bytes(tensor)
        if tensor.HasField("raw_data") and len(tensor.raw_data) != expected:
            return f"initializer '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape needs {expected}"
        if is_on_disk(tensor):
            path, offset, length = location(tensor)
            if not path.is_absolute() or not path.is_file():
                return f"initializer '{tensor.name}' refers to external data '{path}' that cannot be found (pass the model's path, or load it with its external data)"
            if expected and length != expected:
                return f"initializer '{tensor.name}' has {length} bytes of external data, its shape needs {expected}"
            if offset + length > path.stat().st_size:
                return f"initializer '{tensor.name}' reads past the end of its external data file '{path.name}'"
    return None


def constant_node_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [a.t for node in model.graph.node for a in node.attribute if a.HasField("t")]


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node tensors whose data lives in external files."""
    return [t for t in [*model.graph.initializer, *constant_node_tensors(model)] if uses_external_data(t)]


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


def needs_external_data(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """True when the model cannot be serialised as one protobuf (tests lower PROTOBUF_LIMIT)."""
    return model_bytes(model) >= (PROTOBUF_LIMIT if limit is None else limit)


def save_model_atomic(model: onnx.ModelProto, path: str | Path, external_limit: int | None = None) -> list[Path]:
    """Write into a private temporary folder next to the target, then rename into place; returns
    the files written.

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
    staging = tempfiles.make_folder(f".{path.name}.onnxprune", parent=folder)  # also sweeps those of killed runs
    model = with_weights_in_memory(model)  # a model of ours whose weights wait in a temporary file
    try:
        staged = staging / path.name
        if needs_external_data(model, external_limit):
            data_name = f"{path.name}.data"
            small = copy_model(model, skip_graph=("initializer",))
            write_weights(model, small, staging / data_name, data_name)
            _write_bytes(staged, small.SerializeToString())
            _fsync(staging / data_name)
            _fsync(staged)
            with deferred():  # a signal does not leave the weights in place without their model
                os.replace(staging / data_name, folder / data_name)
                os.replace(staged, path)
            return [path, folder / data_name]
        _write_bytes(staged, model.SerializeToString())
        _fsync(staged)
        os.replace(staged, path)
        return [path]
    except OSError as exc:
        raise ResourceError(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        tempfiles.remove(staging)


@contextmanager
def removed_on_failure(paths: list[Path]) -> Iterator[list[Path]]:
    """The outputs in `paths` (a list the block may extend) are removed if the block raises or is
    interrupted: a run that does not finish leaves no partial output."""
    try:
        yield paths
    except BaseException:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        raise


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_memory(model: onnx.ModelProto) -> None:
    """For a large model, hand freed heap pages back to the OS: glibc keeps them otherwise, and a
    finished onnxruntime session's memory would stay counted until the process ends."""
    if model_bytes(model) < LARGE_MODEL:
        return
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_FROM = 2**20


def map_large_allocations() -> None:
    """Process-wide: allocations from 1 MiB on get their own pages from glibc and go back to the
    OS when freed. glibc's default threshold rises with the sizes it has freed (up to 32 MiB), and
    per-batch buffers of a large model then fragment the heap: SmolLM2-135M's calibration peaked
    about 60 MB higher, its verification about 280 MB. `prune` calls this for large models."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
