"""Issue 15: temporary folders name their owner (host, PID, start time); a run removes its own on
every exit and sweeps those of dead owners, also after a SIGKILL; an unusable TMPDIR is a
one-line error, never a silent fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune import tempfiles
from onnxprune.errors import ResourceError
from onnxprune.weights import WeightsFile

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_folders_name_their_owner_and_are_removed(private_tmpdir) -> None:
    folder = tempfiles.make_folder("onnxprune-test")
    assert folder.parent == private_tmpdir and folder.name.startswith(f"onnxprune-test-{tempfiles.owner_tag()}-")
    assert tempfiles.owner_alive(folder.name, "onnxprune-test") and folder in tempfiles.live_folders()
    (folder / "file").write_bytes(b"x")
    tempfiles.remove_all()
    assert not folder.exists() and folder not in tempfiles.live_folders()


def test_the_sweep_removes_dead_owners_only(private_tmpdir) -> None:
    tag = tempfiles.owner_tag()
    namespace, pid, start = tag.split("-")
    dead = private_tmpdir / f"onnxprune-weights-{namespace}-{dead_pid()}-{start}-abc"
    reused = private_tmpdir / f"onnxprune-weights-{namespace}-{os.getppid()}-1-abc"  # a live PID that started at another time
    alive = private_tmpdir / f"onnxprune-weights-{tag}-abc"
    foreign = private_tmpdir / f"onnxprune-weights-00000000-{dead_pid()}-{start}-abc"  # another host: never judged
    unrelated = private_tmpdir / "onnxprune-weights-old-style"
    for folder in (dead, reused, alive, foreign, unrelated):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"\0" * 64)
    removed = tempfiles.sweep(private_tmpdir, "onnxprune-weights")
    expected = {dead} | ({reused} if tempfiles._start_time(os.getppid()) != "0" else set())
    assert set(removed) == expected
    assert all(f.exists() for f in (alive, foreign, unrelated))


def test_a_new_weights_file_sweeps_those_left_by_a_killed_run(private_tmpdir) -> None:
    namespace, _, start = tempfiles.owner_tag().split("-")
    left = private_tmpdir / f"onnxprune-weights-{namespace}-{dead_pid()}-{start}-xyz"
    left.mkdir()
    (left / "weights.bin").write_bytes(b"\0" * 4096)
    weights = WeightsFile()
    assert not left.exists() and weights.folder.exists()
    weights.close()
    assert not weights.folder.exists()


@pytest.mark.parametrize("case", ["missing", "a_file", "read_only"])
def test_an_unusable_tmpdir_is_one_clear_error(tmp_path, monkeypatch, case: str) -> None:
    target = tmp_path / "tmp"
    if case == "a_file":
        target.write_text("not a folder")
    elif case == "read_only":
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):
            monkeypatch.setattr(tempfiles.os, "access", lambda path, mode: False)  # root writes anywhere
    monkeypatch.setenv("TMPDIR", str(target))
    with pytest.raises(ResourceError, match=f"'{target}' \\(TMPDIR\\)"):
        tempfiles.make_folder("onnxprune-test")


SLEEPER = """
import os, sys, time
sys.path.insert(0, {root!r})
from onnxprune import tempfiles
folder = tempfiles.make_folder("onnxprune-weights")
(folder / "weights.bin").write_bytes(b"\\0" * 4096)
print(folder, flush=True)
time.sleep(60)
"""


def test_a_folder_left_by_sigkill_goes_at_the_next_start(private_tmpdir) -> None:
    child = subprocess.Popen([sys.executable, "-c", SLEEPER.format(root=str(ROOT))], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(private_tmpdir)})
    folder = Path(child.stdout.readline().strip())
    assert folder.exists() and tempfiles.sweep(private_tmpdir, "onnxprune-weights") == []  # its owner runs
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert folder.exists()  # nothing ran at the kill
    assert tempfiles.sweep(private_tmpdir, "onnxprune-weights") == [folder] and not folder.exists()


def test_every_cli_start_sweeps_what_killed_runs_left(private_tmpdir, capsys) -> None:
    from builders import cli

    namespace, _, start = tempfiles.owner_tag().split("-")
    left = [private_tmpdir / f"{prefix}-{namespace}-{dead_pid()}-{start}-xyz" for prefix in tempfiles.PREFIXES]
    for folder in left:
        folder.mkdir()
    cli(["inspect", ROOT / "models" / "mlp.ts.onnx", "--json"], capsys)  # needs no temporary file itself
    assert not any(folder.exists() for folder in left)
