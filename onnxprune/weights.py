"""Weights that stay on disk: a large model's initializers are read from their file when needed.

In the pipeline's own copy of a model, a tensor is either in memory (raw_data or typed fields)
or EXTERNAL with an absolute `location`: the user's external-data file, or a private temporary
file that `offload` writes for a large model stored inside its .onnx. Only the weights a stage
actually edits are read, and onnxruntime maps the files instead of copying a serialised model.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
from onnx import numpy_helper

from . import tempfiles
from .errors import ResourceError
from .graph import copy_model
from .tensors import data_bytes, in_memory, is_on_disk, location

LARGE_MODEL = 64 * 2**20  # models of this size keep their weights on disk and reach onnxruntime through files
EXTERNAL_MIN_BYTES = 1024  # tensors from this size on are written to a weights file
PAGE = 4096  # offsets in our weights files are page-aligned, so onnxruntime can map them


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of the model with its weights, those on disk included, without serialising
    it: upb's ByteSize() builds the whole message in memory (twice the model for a moment)."""
    size = copy_model(model, skip_graph=("initializer",)).ByteSize()
    for tensor in model.graph.initializer:
        if is_on_disk(tensor):
            size += location(tensor)[2]
        elif tensor.HasField("raw_data"):  # the checker made sure its length is what the shape needs
            size += data_bytes(tensor) + len(tensor.name) + 8 * len(tensor.dims) + 16
        else:
            size += tensor.ByteSize()
    return size


def has_weights_on_disk(model: onnx.ModelProto) -> bool:
    return any(is_on_disk(t) for t in model.graph.initializer)


class WeightsFile:
    """A private temporary folder with a model's large tensors; removed by `close`, when the
    object is garbage-collected, on any exit of the CLI, or after a SIGKILL by the next run
    (`tempfiles`: the folder names its owner)."""

    def __init__(self) -> None:
        self.folder = tempfiles.make_folder("onnxprune-weights")
        self.path = self.folder / "weights.bin"
        self._cleanup = weakref.finalize(self, tempfiles.remove, self.folder)

    def close(self) -> None:
        self._cleanup()


def _reference(tensor: onnx.TensorProto, path: str, offset: int, length: int) -> onnx.TensorProto:
    ref = onnx.TensorProto()
    ref.name, ref.data_type = tensor.name, tensor.data_type
    ref.dims.extend(tensor.dims)
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", path), ("offset", str(offset)), ("length", str(length))):
        entry = ref.external_data.add()
        entry.key, entry.value = key, value
    return ref


def write_weights(model: onnx.ModelProto, small: onnx.ModelProto, path: Path, location: str) -> None:
    """Write the model's large in-memory initializers to the file `path` (page-aligned, so
    onnxruntime can map them) and append all initializers to `small`: those written as
    references to `location`, the others as they are."""
    with open(path, "wb") as handle:
        for tensor in model.graph.initializer:
            if is_on_disk(tensor) or data_bytes(tensor) < EXTERNAL_MIN_BYTES:
                small.graph.initializer.append(tensor)
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            offset = -(-handle.tell() // PAGE) * PAGE
            handle.seek(offset)
            handle.write(raw)
            small.graph.initializer.append(_reference(tensor, location, offset, len(raw)))
            del raw


def _write_temporary(model: onnx.ModelProto, small: onnx.ModelProto, path: Path, location: str) -> None:
    try:
        write_weights(model, small, path, location)
    except OSError as exc:
        raise ResourceError(f"cannot write the temporary weights file '{path}': {exc.strerror or exc} "
                         "(set TMPDIR to a folder with room for the model)") from None


def offload(model: onnx.ModelProto) -> tuple[onnx.ModelProto, WeightsFile | None]:
    """A copy of a large model whose big in-memory initializers live in a temporary file (the
    model is not changed; drop it to free its memory). Small models and models whose weights are
    already in external files come back as they are, without a file."""
    if model_bytes(model) < LARGE_MODEL or has_weights_on_disk(model):
        return model, None
    weights = WeightsFile()
    copy = copy_model(model, skip_graph=("initializer",))
    _write_temporary(model, copy, weights.path, str(weights.path))
    return copy, weights


@contextmanager
def session_files(model: onnx.ModelProto, drop_outputs: bool = False) -> Iterator[tuple[Path, onnx.ModelProto]]:
    """(folder, small copy) for an onnxruntime session whose external initializers are read from
    `folder` (session option session.model_external_initializers_file_folder_path).

    Weights on disk are referred to where they are; a model with its large weights in memory has
    them written to a temporary file first (onnxruntime holds about one copy of the weights that
    way, about three from serialised bytes). The model is not touched: its protobuf arena would
    keep the memory of any field cleared and set again. `drop_outputs` leaves the graph outputs
    out of the copy (an instrumentation patch brings its own)."""
    small = copy_model(model, skip_graph=("initializer", "output") if drop_outputs else ("initializer",))
    on_disk = [t for t in model.graph.initializer if is_on_disk(t)]
    in_memory = sum(data_bytes(t) for t in model.graph.initializer if not is_on_disk(t))
    if on_disk and in_memory >= MIXED_IN_MEMORY_MAX:
        with _mixed_session_files(model, small, on_disk) as found:
            yield found
        return
    if on_disk:
        folder = Path(os.path.commonpath([location(t)[0].parent for t in on_disk]))
        for tensor in model.graph.initializer:
            if is_on_disk(tensor):
                path, offset, length = location(tensor)
                small.graph.initializer.append(_reference(tensor, path.relative_to(folder).as_posix(), offset, length))
            else:
                small.graph.initializer.append(tensor)
        yield folder, small
        return
    temporary = tempfiles.make_folder("onnxprune-session")
    try:
        _write_temporary(model, small, temporary / "weights.bin", "weights.bin")
        yield temporary, small
    finally:
        tempfiles.remove(temporary)


MIXED_IN_MEMORY_MAX = LARGE_MODEL  # new weights beside on-disk ones go to a file too from here: from serialised bytes onnxruntime
# holds about three copies while the session is made (SmolLM2's auto candidates: +1 GB of peak), and protobuf stops at 2 GB


@contextmanager
def _mixed_session_files(model: onnx.ModelProto, small: onnx.ModelProto, on_disk: list[onnx.TensorProto]) -> Iterator[tuple[Path, onnx.ModelProto]]:
    """A model with weights on disk and more than MIXED_IN_MEMORY_MAX new ones in memory (a
    rewritten working copy of a big model): the new ones are written to a temporary folder and
    the original weight files are linked into it, so one folder holds every file the session reads."""
    temporary = tempfiles.make_folder("onnxprune-session")
    try:
        names: dict[Path, str] = {}
        for tensor in on_disk:
            path = location(tensor)[0]
            if path not in names:
                names[path] = f"linked{len(names)}_{path.name}"
                _link(path, temporary / names[path])
        _write_temporary(model, small, temporary / "weights.bin", "weights.bin")
        for i, tensor in enumerate(small.graph.initializer):
            if is_on_disk(tensor) and location(tensor)[0] in names:
                path, offset, length = location(tensor)
                small.graph.initializer[i].CopyFrom(_reference(tensor, names[path], offset, length))
        yield temporary, small
    finally:
        tempfiles.remove(temporary)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # a hard link: onnxruntime sees a plain file inside the folder
    except OSError:
        try:
            os.symlink(os.path.abspath(source), target)
        except OSError as exc:
            raise ResourceError(f"cannot link the weights file '{source}' into '{target.parent}': {exc.strerror or exc}") from None


def with_weights_in_memory(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with every on-disk initializer read into memory (the model itself if
    it has none)."""
    if not has_weights_on_disk(model):
        return model
    copy = copy_model(model, skip_graph=("initializer",))
    copy.graph.initializer.extend(in_memory(t) for t in model.graph.initializer)
    return copy
