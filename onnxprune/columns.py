"""Calibration arrays read a batch at a time: a `Column` knows its shape and dtype and reads the
samples [start, stop) on demand, so memory holds one batch whatever the set's size.

A .npy, and the uncompressed members of a .npz, are read by offset with plain reads (not mapped:
mapped pages count in the process's RSS until the kernel drops them, and a file truncated under
a mapping kills the process with SIGBUS where a short read is a clean error); compressed members
are decompressed as a stream. Pickled objects are refused from the header on, never unpickled.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from .errors import CalibrationError

SKIP_CHUNK = 16 * 2**20  # bytes decompressed at a time when a stream skips to a later sample


class Column(Protocol):
    """Samples on axis 0 of one input, read a range at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, start: int, stop: int) -> np.ndarray: ...


@dataclass
class MemoryColumn:
    """An array already in memory."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


def row_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of one sample (one row along axis 0) of a column."""
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def _truncated(source: str, stop: int, got: int, wanted: int) -> CalibrationError:
    return CalibrationError(f"calibration file '{source}' is truncated: samples up to {stop} need {wanted} bytes, "
                            f"{got} could be read (was the file cut short, or changed while onnxprune read it?)")


@dataclass
class FileColumn:
    """Raw C-order samples at `offset` in a file (a .npy's data, a stored .npz member, a spool).
    `owner` keeps alive whatever must outlive the column (a temporary spool folder)."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    source: str
    owner: Any = field(default=None, repr=False, compare=False)

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        out = np.empty((max(stop - start, 0), *self.shape[1:]), self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        row = row_bytes(self.shape, self.dtype)
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset + start * row)
                got = 0
                while got < len(view):
                    count = handle.readinto(view[got:])
                    if not count:
                        raise _truncated(self.source, stop, got, len(view))
                    got += count
        except OSError as exc:
            raise CalibrationError(f"cannot read calibration file '{self.source}': {exc.strerror or exc}") from None
        return out


@dataclass
class StreamColumn:
    """A compressed .npz member, decompressed in order; reading an earlier sample restarts the stream."""

    path: Path
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: str
    _stream: tuple[zipfile.ZipFile, BinaryIO] | None = field(default=None, repr=False, compare=False)
    _position: int = field(default=0, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None, "_position": 0}  # a copy opens its own stream

    def _restart(self) -> BinaryIO:
        self.close()
        archive = zipfile.ZipFile(self.path)
        stream = archive.open(self.member)
        _header(stream, self.source)
        self._stream, self._position = (archive, stream), 0
        return stream

    def close(self) -> None:
        if self._stream is not None:
            for part in reversed(self._stream):
                part.close()
            self._stream = None

    def _read_exact(self, stream: BinaryIO, count: int, stop: int) -> bytes:
        data = stream.read(count)
        if len(data) != count:
            raise _truncated(self.source, stop, len(data), count)
        return data

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        row = row_bytes(self.shape, self.dtype)
        try:
            stream = self._stream[1] if self._stream is not None and self._position <= start else self._restart()
            while self._position < start:
                rows = min(start - self._position, max(1, SKIP_CHUNK // max(row, 1)))
                self._read_exact(stream, rows * row, start)
                self._position += rows
            data = self._read_exact(stream, (stop - start) * row, stop)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
            self.close()
            raise CalibrationError(f"cannot read calibration file '{self.source}' (member '{self.member}'): {exc}") from None
        self._position = stop
        return np.frombuffer(data, self.dtype).reshape(stop - start, *self.shape[1:]).copy()


def _header(handle: BinaryIO, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a .npy header; object dtypes are refused."""
    try:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
    except (ValueError, EOFError, OSError) as exc:
        raise CalibrationError(f"calibration file '{source}' is not a readable .npz/.npy file ({exc})") from None
    if dtype.hasobject:
        raise CalibrationError(f"calibration file '{source}' holds pickled Python objects; only numeric arrays are read")
    return tuple(shape), bool(fortran) and len(shape) > 1, dtype


def _whole(handle: BinaryIO, source: str) -> MemoryColumn:
    """A Fortran-order array (rows are not contiguous): read whole, as NumPy does."""
    handle.seek(0)
    try:
        return MemoryColumn(np.lib.format.read_array(handle, allow_pickle=False))
    except (ValueError, EOFError, OSError) as exc:
        raise CalibrationError(f"calibration file '{source}' is not a readable .npz/.npy file ({exc})") from None


def open_npy(path: Path, source: str) -> Column:
    """A column over a .npy file, checked against the file's size now."""
    with open(path, "rb") as handle:
        shape, fortran, dtype = _header(handle, source)
        if fortran:
            return _whole(handle, source)
        offset = handle.tell()
    column = FileColumn(path, offset, shape, dtype, source)
    wanted, size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, path.stat().st_size - offset
    if size < wanted:
        raise _truncated(source, shape[0] if shape else 0, size, wanted)
    return column


def _stored_offset(handle: BinaryIO, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start: after its local header, name and extra field."""
    handle.seek(info.header_offset)
    local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member '{info.filename}'")
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def _member_column(path: Path, archive: zipfile.ZipFile, handle: BinaryIO, info: zipfile.ZipInfo, source: str) -> Column:
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:
        handle.seek(_stored_offset(handle, info))
        start = handle.tell()
        shape, fortran, dtype = _header(handle, source)
        if not fortran:
            offset = handle.tell()
            wanted = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if offset - start + wanted > info.file_size:
                raise _truncated(source, shape[0] if shape else 0, info.file_size - (offset - start), wanted)
            return FileColumn(path, offset, shape, dtype, source)
    with archive.open(info) as stream:
        shape, fortran, dtype = _header(stream, source)
        if fortran:
            return MemoryColumn(np.lib.format.read_array(archive.open(info), allow_pickle=False))
    return StreamColumn(path, info.filename, shape, dtype, source)


def open_npz(path: Path, source: str) -> dict[str, Column]:
    """One column per member of a .npz, keyed as NumPy keys them (the name without '.npy')."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            return {(info.filename[:-4] if info.filename.endswith(".npy") else info.filename):
                    _member_column(path, archive, handle, info, source) for info in archive.infolist()}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise CalibrationError(f"calibration file '{source}' is not a readable .npz/.npy file ({exc})") from None
