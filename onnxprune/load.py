"""Reading the user's model and writing ours: never modify the input, write atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelError


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
            model = onnx.load_model(str(path), load_external_data=True)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise ModelError(f"'{path}' is not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        except OSError as exc:
            raise ModelError(f"cannot read model file '{path}': {exc.strerror or exc}") from None
    if not model.graph.node:
        raise ModelError(f"'{name}' is not an ONNX model with a graph (no nodes found)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError and others
        raise ModelError(f"'{name}' fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return model, name


def default_output_path(model_path: str | Path) -> Path:
    """MODEL.onnx -> MODEL.pruned.onnx"""
    path = Path(model_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(f"{stem}.pruned.onnx")


def save_model_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Write to a temporary file in the target folder, then rename over the target."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise ModelError(f"output folder '{folder}' is not writable")
    payload = model.SerializeToString()
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
