"""Where the sequential pass keeps what outlives a segment: the activations at the current cut
(per batch, in memory up to a budget and in temporary files beyond) and the fitted recoveries
of finished segments (memory-mapped files until the final rewrite folds them), so its memory
does not grow with depth (docs/design.md, "Sequential (error-correcting) recovery")."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tempfiles
from .recovery import Recovery

SPILL_BYTES = 64 << 20  # cached activations beyond this (per model) go to temporary files
RECOVERY_SPILL_BYTES = 1 << 20  # a fitted recovery's maps beyond this wait in a file for the final rewrite


class RecoverySpill:
    """The fitted recoveries of the segments already done: their k x n maps go to .npy files in an
    owner-named temporary folder and are read back memory-mapped (by a later segment's working
    copy or the final rewrite), so the pass's memory does not grow with depth (a 7B model's FFN
    site alone holds about 350 MB of them)."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.count = 0

    def spill(self, recovery: Recovery) -> Recovery:
        arrays = {"weights": recovery.weights, "kept_weights": recovery.kept_weights}
        if sum(a.nbytes for a in arrays.values() if a is not None) < RECOVERY_SPILL_BYTES:  # called once per site
            return recovery
        if self.folder is None:
            self.folder = tempfiles.make_folder(tempfiles.BOUNDARY_PREFIX)
        mapped = {}
        for name, array in arrays.items():
            if array is not None:
                path = self.folder / f"{self.count}.npy"
                self.count += 1
                np.save(path, array)
                mapped[name] = np.load(path, mmap_mode="r")
        return dataclasses.replace(recovery, **mapped)

    def close(self) -> None:
        if self.folder is not None:
            tempfiles.remove(self.folder)
            self.folder = None


class SpillFile:
    """One tensor's spilled batches, appended to one temporary file and read back a batch at a
    time (one `pread` into a fresh array: a memory map of the whole file would keep every page
    read in the process's resident set). A file per batch cost an open, a header and an unlink
    per batch and tensor, about a fifth of a small CNN's sequential pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by `close` or by the first read
        self.size = 0
        self.reader: int | None = None

    def append(self, value: np.ndarray) -> int:
        if self.handle is None:
            raise RuntimeError(f"{self.path}: appended after it was read")
        offset = self.size
        data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        self.handle.write(data)
        self.size += len(data)
        return offset

    def read(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.reader is None:
            self.handle.close()
            self.handle = None
            self.reader = os.open(self.path, os.O_RDONLY)
        value = np.empty(shape, dtype=dtype)
        buffer, done = value.reshape(-1).view(np.uint8), 0
        while done < len(buffer):  # one call reads at most about 2 GB
            count = os.preadv(self.reader, [buffer[done:]], offset + done)
            if count <= 0:
                raise OSError(f"{self.path}: short read at {offset + done}")
            done += count
        return value

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.reader is not None:
            os.close(self.reader)
            self.reader = None
        self.path.unlink(missing_ok=True)


@dataclass
class OnDisk:
    """A cached activation in a tensor's spill file; `selections` (axis, positions) narrow it as
    it is read back, so narrowing a spilled tensor costs no second write and read."""

    file: SpillFile
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    selections: tuple[tuple[int, np.ndarray], ...] = ()

    def load(self) -> np.ndarray:
        value = self.file.read(self.offset, self.shape, self.dtype)
        for axis, positions in self.selections:
            value = np.take(value, positions, axis=axis)
        return value

    def narrowed(self, axis: int, positions: np.ndarray) -> OnDisk:
        return dataclasses.replace(self, selections=(*self.selections, (axis, positions)))


class BoundaryCache:
    """Activations at the current cut, per batch; beyond SPILL_BYTES in memory they go to files
    (one per tensor) in an owner-named temporary folder, so memory stays at about one batch's worth."""

    def __init__(self) -> None:
        self.values: list[dict[str, np.ndarray | OnDisk]] = []  # one dict per batch, in batch order
        self.bytes = 0
        self.folder: Path | None = None
        self.files: dict[str, SpillFile] = {}
        self.count = 0

    def keep_only(self, names: set[str]) -> None:
        for values in self.values:
            for name in [n for n in values if n not in names]:
                value = values.pop(name)
                if not isinstance(value, OnDisk):
                    self.bytes -= value.nbytes
        for name in [n for n in self.files if n not in names]:
            self.files.pop(name).close()

    def put(self, batch: int, name: str, value: np.ndarray) -> None:
        while len(self.values) <= batch:
            self.values.append({})
        if self.bytes + value.nbytes > SPILL_BYTES:
            if self.folder is None:  # owner-named: swept by a later run if this one is killed
                self.folder = tempfiles.make_folder(tempfiles.BOUNDARY_PREFIX)
            if name not in self.files:
                self.files[name] = SpillFile(self.folder / f"{self.count}.bin")
                self.count += 1
            offset = self.files[name].append(value)
            self.values[batch][name] = OnDisk(self.files[name], offset, value.shape, value.dtype)
        else:
            self.bytes += value.nbytes
            self.values[batch][name] = value

    def has(self, batch: int, name: str) -> bool:
        return batch < len(self.values) and name in self.values[batch]

    def get(self, batch: int, name: str) -> np.ndarray:
        value = self.values[batch][name]
        return value.load() if isinstance(value, OnDisk) else value

    def names(self) -> set[str]:
        return set(self.values[0]) if self.values else set()

    def select(self, name: str, axis: int, positions: np.ndarray) -> None:
        """Keep only `positions` on `axis` of a cached tensor, in every batch (spilled batches
        are narrowed as they are read back)."""
        for values in self.values:
            value = values[name]
            if isinstance(value, OnDisk):
                values[name] = value.narrowed(axis, positions)
            else:
                values[name] = np.take(value, positions, axis=axis)
                self.bytes += values[name].nbytes - value.nbytes

    def dtypes(self) -> dict[str, np.dtype]:
        return {name: value.dtype for name, value in self.values[0].items()} if self.values else {}

    def close(self) -> None:
        self.values = []
        for file in self.files.values():
            file.close()
        self.files = {}
        if self.folder is not None:
            tempfiles.remove(self.folder)
