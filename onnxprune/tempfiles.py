"""Private temporary folders that name their owner, so that no run leaves files behind for good.

Every folder is `<prefix>-<host>-<pid>-<start>-<random>`: the host and PID namespace (`host`),
the owner's PID and its start time (`start`, from /proc: a reused PID does not look alive). A
clean exit, an exception or a handled signal removes the folders of this process (`remove_all`);
after a SIGKILL the next run that needs a folder in the same place removes those of dead owners
(`sweep`). docs/design.md says why weights files are not unlinked early instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import ResourceError

_LIVE: set[Path] = set()  # folders this process made and has not removed yet
_SWEPT: set[tuple[Path, str]] = set()  # (parent, prefix) pairs this process has swept


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('0' where /proc is not there)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "0"
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else "0"


def _namespace() -> str:
    """Eight hex digits for this host and PID namespace: containers sharing a folder do not judge
    each other's PIDs."""
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = 0
    return hashlib.sha256(f"{socket.gethostname()}:{pid_ns}".encode()).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """`<host>-<pid>-<start>`: what a folder name says about its owner."""
    pid = os.getpid() if pid is None else pid
    return f"{_namespace()}-{pid}-{_start_time(pid)}"


def owner_alive(name: str, prefix: str) -> bool:
    """Whether the owner named in folder `name` (made with `prefix`) may still run; folders of other
    hosts or namespaces, and names that do not parse, count as alive (never removed)."""
    parts = name[len(prefix) + 1:].split("-")
    if len(parts) < 4 or parts[0] != _namespace() or not parts[1].isdigit():
        return True
    pid, start = int(parts[1]), parts[2]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start == "0" or _start_time(pid) in ("0", start)


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders `<prefix>-*` in `parent` whose owners are dead; returns them."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefix + "-") and entry.is_dir() and not entry.is_symlink() and not owner_alive(entry.name, prefix):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


BOUNDARY_PREFIX = "onnxprune-boundary"  # the sequential pass's cached activations
PREFIXES = ("onnxprune-weights", "onnxprune-session", "onnxprune-calib", BOUNDARY_PREFIX)  # what the pipeline makes in TMPDIR


def sweep_temporary_root() -> list[Path]:
    """Sweep every kind of onnxprune folder in TMPDIR (the CLI does it at each start, so a killed
    run's files go at the next run, whether or not that one needs temporary files)."""
    try:
        root = temporary_root()
    except ResourceError:  # reported if and when a folder is needed
        return []
    removed = []
    for prefix in PREFIXES:
        removed += sweep(root, prefix)
        _SWEPT.add((root, prefix))
    return removed


def temporary_root() -> Path:
    """The folder for temporary files: $TMPDIR when set (an unusable one is an error, not a silent
    fallback to another disk), else Python's default."""
    wanted = os.environ.get("TMPDIR")
    root = Path(wanted) if wanted else Path(tempfile.gettempdir())
    if not root.is_dir():
        raise ResourceError(f"the temporary folder '{root}' (TMPDIR) does not exist; set TMPDIR to a folder with room for the model")
    if not os.access(root, os.W_OK | os.X_OK):
        raise ResourceError(f"the temporary folder '{root}' (TMPDIR) is not writable; set TMPDIR to a writable folder")
    return root


def make_folder(prefix: str, parent: Path | None = None) -> Path:
    """A new private folder `<prefix>-<owner>-<random>` in `parent` (default: the temporary root),
    after sweeping the dead owners' folders there once per process."""
    hint = " (set TMPDIR to a writable folder)" if parent is None else ""
    parent = temporary_root() if parent is None else parent
    if (parent, prefix) not in _SWEPT:
        sweep(parent, prefix)
        _SWEPT.add((parent, prefix))
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{prefix}-{owner_tag()}-", dir=parent))
    except OSError as exc:
        raise ResourceError(f"cannot write to folder '{parent}': {exc.strerror or exc}{hint}") from None
    _LIVE.add(folder)
    return folder


def remove(folder: Path) -> None:
    """Remove a folder made by `make_folder` (again or never made: nothing happens)."""
    shutil.rmtree(folder, ignore_errors=True)
    _LIVE.discard(folder)


def remove_all() -> None:
    """Remove every folder this process made and still holds (the CLI calls it on every exit)."""
    for folder in list(_LIVE):
        remove(folder)


def live_folders() -> list[Path]:
    """The folders this process holds now (for tests and the fault-injection suite)."""
    return sorted(_LIVE)
