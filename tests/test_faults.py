"""Issue 15: fault injection. An exception, SIGINT or SIGTERM at every stage boundary (load,
calibrate, score, plan, rewrite, verify, write), ENOSPC and EIO while writing the model and its
external data, an unusable TMPDIR and a calibration file truncated mid-read: every case ends with
one line on stderr, a non-zero exit, the input's bytes unchanged, no output and no temporary file.

Every model counts as large (LARGE_MODEL = 0), so its weights wait in a temporary file and every
session goes through a temporary folder, and the output is written with external data: each
fault has files to leave behind."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune.api
import onnxprune.calibrate
import onnxprune.cli
import onnxprune.load
import onnxprune.preparation
import onnxprune.refit
import onnxprune.report
import onnxprune.verify
import onnxprune.weights
from builders import cli, random_cnn, treat_as_large
from onnxprune import tempfiles

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # stage -> (module, function): the fault fires when the stage's function returns
    "load": (onnxprune.api, "prepare"),
    "calibrate": (onnxprune.preparation, "collect_stats"),
    "score": (onnxprune.api, "score_space"),
    "plan": (onnxprune.api, "allocation_planner"),
    "rewrite": (onnxprune.refit, "rewrite"),  # the CNN is refitted sequentially: its model is rewritten there
    "verify": (onnxprune.api, "verify"),
    "write": (onnxprune.load, "_write_bytes"),
    "report": (onnxprune.report.PruneReport, "write_json"),
}
FAULTS = {"exception": 1, "SIGINT": 130, "SIGTERM": 143}


class Run:
    """An input folder (model + calibration data), an empty output folder and a private TMPDIR."""

    def __init__(self, root: Path, monkeypatch) -> None:
        self.src, self.out, self.tmp = root / "in", root / "out", root / "tmpdir"
        for folder in (self.src, self.out, self.tmp):
            folder.mkdir()
        self.model = self.src / "net.onnx"
        onnx.save(random_cnn(channels=(3, 16, 16), hw=8, seed=1), str(self.model))
        self.calib = self.src / "calib.npy"
        np.save(self.calib, np.random.default_rng(0).standard_normal((96, 3, 8, 8)).astype(np.float32))
        self.result = self.out / "pruned.onnx"
        self.digest = hashlib.sha256(self.model.read_bytes()).hexdigest()
        self.inputs = ["calib.npy", "net.onnx"]  # what the input folder holds
        monkeypatch.setenv("TMPDIR", str(self.tmp))
        monkeypatch.setattr(tempfile, "tempdir", str(self.tmp))
        treat_as_large(monkeypatch)
        monkeypatch.setattr(onnxprune.load, "PROTOBUF_LIMIT", 1000)  # the output gets <name>.data

    def argv(self, *extra) -> list:
        return [self.model, "--calib", self.calib, "-o", self.result, "--ratio", "0.3", "--batch-size", "16",
                "--report", self.out / "report.json", "-q", *extra]

    def failed(self, code: int, err: str, exit_code: int, *fragments: str) -> str:
        """The checks every failed run must pass; returns its one stderr line."""
        lines = err.splitlines()
        assert code == exit_code, f"exit {code}, expected {exit_code}: {err!r}"
        assert len(lines) == 1 and lines[0].startswith("onnxprune: ") and "Traceback" not in err, lines
        assert all(f in lines[0] for f in fragments), lines[0]
        assert hashlib.sha256(self.model.read_bytes()).hexdigest() == self.digest
        assert sorted(p.name for p in self.src.iterdir()) == self.inputs
        assert list(self.out.iterdir()) == [], "partial output left"
        assert list(self.tmp.iterdir()) == [] and tempfiles.live_folders() == [], "temporary files left"
        return lines[0]


@pytest.fixture()
def run(tmp_path, monkeypatch) -> Run:
    return Run(tmp_path, monkeypatch)


def fire(fault: str) -> None:
    if fault == "exception":
        raise RuntimeError("injected fault")
    os.kill(os.getpid(), getattr(signal, fault))
    time.sleep(1)  # the handler raises before this returns
    raise AssertionError(f"{fault} did not interrupt the run")


def test_the_run_without_faults_writes_the_model_its_data_and_the_report(run: Run, capsys) -> None:
    code, _, err = cli(run.argv(), capsys)
    assert code == 0, err
    assert sorted(p.name for p in run.out.iterdir()) == ["pruned.onnx", "pruned.onnx.data", "report.json"]
    assert list(run.tmp.iterdir()) == [] and tempfiles.live_folders() == []


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_at_every_stage_boundary_leaves_nothing(run: Run, capsys, monkeypatch, stage: str, fault: str) -> None:
    owner, name = STAGES[stage]
    real = getattr(owner, name)
    seen = {}

    def faulty(*args, **kwargs):
        result = real(*args, **kwargs)
        seen["files"] = [*run.tmp.iterdir(), *run.out.iterdir()]
        fire(fault)
        return result

    monkeypatch.setattr(owner, name, faulty)
    code, _, err = cli(run.argv(), capsys)
    expected = {"exception": "internal error: RuntimeError: injected fault", "SIGINT": "interrupted (SIGINT)", "SIGTERM": "interrupted (SIGTERM)"}
    run.failed(code, err, FAULTS[fault], expected[fault])
    assert seen["files"], "the fault fired before any temporary file or output existed"


def test_sighup_exits_129(run: Run, capsys, monkeypatch) -> None:
    real = onnxprune.api.verify
    monkeypatch.setattr(onnxprune.api, "verify", lambda *a, **k: (real(*a, **k), fire("SIGHUP")))
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 129, "interrupted (SIGHUP)")


def test_handlers_are_restored_after_the_run(run: Run, capsys) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    cli(run.argv(), capsys)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_does_not_cut_the_cleanup_short(run: Run, capsys, monkeypatch) -> None:
    real, armed, fired = tempfiles.remove, [], []

    def remove_under_fire(folder):
        if armed and not fired:  # the first removal after the SIGINT below: the run cleans up
            fired.append(folder)
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler that signals twice
        real(folder)

    def verify_then_sigint(*args, **kwargs):
        result = real_verify(*args, **kwargs)
        armed.append(True)
        fire("SIGINT")
        return result

    monkeypatch.setattr(tempfiles, "remove", remove_under_fire)
    real_verify = onnxprune.api.verify
    monkeypatch.setattr(onnxprune.api, "verify", verify_then_sigint)
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 130, "interrupted (SIGINT)")
    assert fired


def failing_open(target: Path, error: int, after: int = 100):
    """`open` that fails with `error` after `after` bytes when writing a file under `target`."""
    real = open

    class Failing:
        def __init__(self, handle) -> None:
            self.handle, self.written = handle, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def write(self, data) -> int:
            room = max(after - self.written, 0)
            if len(data) > room:
                self.handle.write(bytes(data[:room]))
                raise OSError(error, os.strerror(error))
            self.written += len(data)
            return self.handle.write(data)

    def opener(path, mode="r", *args, **kwargs):
        handle = real(path, mode, *args, **kwargs)
        return Failing(handle) if "w" in mode and Path(path).resolve().is_relative_to(target.resolve()) else handle

    return opener


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("part", ["model", "external data"])
def test_disk_errors_while_writing_the_output(run: Run, capsys, monkeypatch, part: str, error: int) -> None:
    module = onnxprune.load if part == "model" else onnxprune.weights
    monkeypatch.setattr(module, "open", failing_open(run.out, error), raising=False)
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 2, "onnxprune: error: cannot write", str(run.result), os.strerror(error))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_disk_errors_while_writing_the_temporary_weights(run: Run, capsys, monkeypatch, error: int) -> None:
    monkeypatch.setattr(onnxprune.weights, "open", failing_open(run.tmp, error), raising=False)
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 2, "temporary weights file", os.strerror(error), "TMPDIR")


@pytest.mark.parametrize("case", ["missing", "a file"])
def test_an_unusable_tmpdir(run: Run, capsys, monkeypatch, case: str) -> None:
    target = run.src.parent / "no_such_tmp"
    if case == "a file":
        target.write_text("")
    monkeypatch.setenv("TMPDIR", str(target))
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 2, str(target), "TMPDIR")


@pytest.mark.parametrize("kind", ["npy", "stored npz", "compressed npz"])
def test_a_calibration_file_truncated_mid_read(run: Run, capsys, monkeypatch, kind: str) -> None:
    if kind != "npy":
        x = np.load(run.calib)
        run.calib.unlink()
        run.calib, run.inputs = run.calib.with_name("calib.npz"), ["calib.npz", "net.onnx"]
        (np.savez if kind == "stored npz" else np.savez_compressed)(run.calib, x=x)
    real = onnxprune.preparation.collect_stats

    def cut_after_the_first_batch(model, sites, ranks, batches, *args, **kwargs):
        def cutting():
            for i, batch in enumerate(batches):
                yield batch
                if i == 0:
                    os.truncate(run.calib, run.calib.stat().st_size // 2)
        return real(model, sites, ranks, cutting(), *args, **kwargs)

    monkeypatch.setattr(onnxprune.preparation, "collect_stats", cut_after_the_first_batch)
    code, _, err = cli(run.argv(), capsys)
    run.failed(code, err, 2, "onnxprune: error:", run.calib.name)


LOADER = """
import os, time
import numpy as np

def load_data():
    rng = np.random.default_rng(0)
    for i in range(4):
        yield {"x": rng.standard_normal((16, 2048)).astype(np.float32)}
    open(os.environ["READY"], "w").close()
    time.sleep(30)
    yield {"x": rng.standard_normal((16, 2048)).astype(np.float32)}
"""


def large_mlp(path: Path) -> None:
    """2048 -> 4608 -> 2048 -> 4: 72 MiB of embedded weights, over LARGE_MODEL (a temporary file)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), f"w{i}")
               for i, shape in enumerate([(2048, 4608), (4608, 2048), (2048, 4)])]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"), helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def ours(folder: Path) -> list[Path]:
    """onnxprune's entries in a TMPDIR that other programs (the interpreter's site hooks) also use."""
    return [p for p in folder.iterdir() if p.name.startswith("onnxprune-")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_real_signal_to_a_real_process_removes_the_weights_file(tmp_path, signum: int) -> None:
    """The issue's case: a model with embedded weights over LARGE_MODEL (a temporary weights file)
    stopped by a scheduler's signal while it calibrates."""
    model, tmp, out = tmp_path / "large.onnx", tmp_path / "tmpdir", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    large_mlp(model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "loader.py").write_text(LOADER)
    ready = tmp_path / "ready"
    env = {**os.environ, "TMPDIR": str(tmp), "READY": str(ready), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "onnxprune", str(model), "--data-loader-script", f"{tmp_path / 'loader.py'}:load_data",
                              "-o", str(out / "p.onnx"), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), child.communicate()
    held = sorted(p.name.split("-")[1] for p in ours(tmp))
    assert held == ["calib", "weights"], held  # the weights file and the loader's spool exist now
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [f"onnxprune: interrupted ({signal.Signals(signum).name})"] and stdout == ""
    assert ours(tmp) == [] and list(out.iterdir()) == []
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
