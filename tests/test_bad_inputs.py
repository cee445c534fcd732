"""The bad-input matrix of the command line (cases that tests/test_cli.py does not already cover).

Every refused run must: exit with code 2 (argparse errors included), print exactly one line on
stderr that starts with "onnxprune: error: " and names the problem (file, tensor, flag,
expected vs got), print no traceback (unless --debug), leave the input model's bytes alone, and
leave nothing in the output folder: no model, no report, no temporary file. Runs that only
deserve a warning (extra calibration arrays, safe casts, too few samples for a layer) must
succeed and say so on stderr with -q.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
import onnxprune.api
import onnxprune.preparation
import onnxprune.refit
from builders import GraphBuilder, cli, random_cnn, random_mlp, run

MLP_WIDTHS = (16, 24, 12, 4)  # x[16] -> 24 -> 12 -> 4


# -- fixtures and helpers ---------------------------------------------------------------------
class Env:
    """An input folder (model + good calibration data) and an empty output folder."""

    def __init__(self, root: Path):
        self.src = root / "in"
        self.out = root / "out"
        self.src.mkdir()
        self.out.mkdir()
        self.model = self.src / "net.onnx"
        onnx.save(random_mlp(widths=MLP_WIDTHS, seed=2), str(self.model))
        self.data = np.random.default_rng(0).standard_normal((120, 16)).astype(np.float32)
        self.calib = self.src / "calib.npz"
        np.savez(self.calib, x=self.data)
        self.result = self.out / "result.onnx"

    def npz(self, name: str, **arrays) -> Path:
        path = self.src / name
        np.savez(path, **arrays)
        return path

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.src / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def cnn(self) -> Path:
        """A CNN with a static input [N, 3, 8, 8]."""
        path = self.src / "cnn.onnx"
        onnx.save(random_cnn(channels=(3, 8, 6), hw=8, seed=1), str(path))
        return path


@pytest.fixture()
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(env: Env) -> dict[str, str]:
    """Every file of both folders with its hash (the output folder is expected to stay empty)."""
    return {str(p.relative_to(env.src.parent)): digest(p) if p.is_file() else "<dir>" for p in sorted(env.src.parent.rglob("*"))}


def error_line(code: int, out: str, err: str, *fragments: str, exit_code: int = 2) -> str:
    """The one stderr line of a refused run; checks the code, the prefix, the fragments, no traceback."""
    assert code == exit_code, f"exit code {code}, expected {exit_code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines}"
    line = lines[0]
    prefix = "onnxprune: error: " if exit_code == 2 else "onnxprune: "
    assert line.startswith(prefix), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert out == "", f"nothing on stdout for a refused run, got {out!r}"
    return line


def refused(env: Env, capsys, argv: list, *fragments: str, exit_code: int = 2, output: Path | None = None) -> str:
    """Run the CLI on argv (+ -o output); the run must be refused cleanly and change no file."""
    output = env.result if output is None else output
    before = snapshot(env)
    code, out, err = cli([*argv, "-o", output], capsys)
    line = error_line(code, out, err, *fragments, exit_code=exit_code)
    assert not output.exists()
    assert snapshot(env) == before, "a refused run changed, created or left files behind"
    assert list(env.out.iterdir()) == []
    return line


def succeeded(env: Env, capsys, argv: list) -> tuple[str, onnx.ModelProto]:
    """Run with -q; returns stderr and the (checked, runnable) output model."""
    model_before = digest(env.model)
    code, out, err = cli([*argv, "-o", env.result, "-q"], capsys)
    assert code == 0, err
    assert out == ""
    assert "Traceback" not in err
    assert digest(env.model) == model_before
    pruned = onnx.load(str(env.result))
    onnx.checker.check_model(pruned, full_check=True)
    assert run(pruned, env.data[:5]).shape == (5, MLP_WIDTHS[-1])
    assert sorted(p.name for p in env.out.iterdir()) == [env.result.name]  # no temporary file
    return err, pruned


def warnings_in(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("onnxprune: warning: ") for line in lines), lines
    return lines


# -- the model file -----------------------------------------------------------------------------
def _model_bytes(env: Env) -> bytes:
    return env.model.read_bytes()


@pytest.mark.parametrize("case", ["text", "random_bytes", "empty", "truncated"])
def test_model_file_that_is_not_onnx(env: Env, capsys, case: str) -> None:
    content = {
        "text": "ir_version: 8\nthis is a text file, not a protobuf\n",
        "random_bytes": np.random.default_rng(7).bytes(4096),
        "empty": b"",
        "truncated": _model_bytes(env)[: len(_model_bytes(env)) // 2],  # the first half of a real model
    }[case]
    bad = env.file(f"{case}.onnx", content)
    refused(env, capsys, [bad, "--calib", env.calib, "--ratio", "0.2"], f"{case}.onnx")


def test_model_that_fails_the_checker(env: Env, capsys) -> None:
    """A node reads a tensor that nothing defines."""
    model = onnx.load(str(env.model))
    model.graph.node[1].input[0] = "ghost_tensor"
    bad = env.src / "dangling.onnx"
    onnx.save(model, str(bad))
    line = refused(env, capsys, [bad, "--calib", env.calib, "--ratio", "0.2"], "dangling.onnx", "ghost_tensor")
    assert "checker" in line


def test_model_with_nothing_to_prune(env: Env, capsys) -> None:
    """A single Conv whose output is the graph output: its units cannot go."""
    g = GraphBuilder([None, 3, 8, 8])
    y = g.conv(g.input_name, np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), np.zeros(4, np.float32), name="only_conv")
    path = env.src / "single.onnx"
    onnx.save(g.build(y, ["N", 4, 6, 6]), str(path))
    calib = env.npz("images.npz", x=np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32))
    refused(env, capsys, [path, "--calib", calib, "--ratio", "0.2"], "nothing to prune", "single.onnx")


# -- the calibration file ---------------------------------------------------------------------
def _truncated_npy(env: Env) -> bytes:
    path = env.src / "full.npy"
    np.save(path, env.data)
    content = path.read_bytes()
    path.unlink()
    return content[: len(content) // 2]


@pytest.mark.parametrize("case", ["text.npz", "random.npz", "random.npy", "truncated.npy", "model.npz"])
def test_calibration_file_that_is_not_numpy(env: Env, capsys, case: str) -> None:
    """Not .npz/.npy data. The message must not claim the file holds (pickled) Python objects:
    it does not, it is simply not a NumPy file."""
    content = {
        "text.npz": "x,y\n1,2\n3,4\n",
        "random.npz": np.random.default_rng(3).bytes(4096),
        "random.npy": np.random.default_rng(4).bytes(4096),
        "truncated.npy": _truncated_npy(env),
        "model.npz": env.model.read_bytes(),  # an ONNX file passed as --calib
    }[case]
    bad = env.file(case, content)
    line = refused(env, capsys, [env.model, "--calib", bad, "--ratio", "0.2"], case)
    assert "Python objects" not in line and "pickled" not in line, f"misleading diagnosis: {line}"


def test_calibration_file_empty(env: Env, capsys) -> None:
    bad = env.file("empty.npz", b"")
    refused(env, capsys, [env.model, "--calib", bad, "--ratio", "0.2"], "empty.npz")


def test_calibration_path_is_a_folder_of_non_images(env: Env, capsys) -> None:
    """--calib FOLDER on a CNN: a folder with no image in it."""
    folder = env.src / "pictures"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    refused(env, capsys, [env.cnn(), "--calib", folder, "--ratio", "0.2"], "pictures", "no images")


def test_calibration_folder_with_a_corrupt_image(env: Env, capsys) -> None:
    folder = env.src / "pictures"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    refused(env, capsys, [env.cnn(), "--calib", folder, "--ratio", "0.2"], "broken.png")


def test_calibration_folder_for_a_model_without_image_input(env: Env, capsys) -> None:
    folder = env.src / "pictures"
    folder.mkdir()
    refused(env, capsys, [env.model, "--calib", folder, "--ratio", "0.2"], "'x'")


@pytest.mark.parametrize("shape,fragments", [
    ((20, 1, 8, 8), ("'x'", "axis 1", "1", "3")),  # channels
    ((20, 3, 8, 9), ("'x'", "axis 3", "9", "8")),  # width
    ((20, 3, 64), ("'x'", "rank 3", "rank 4")),
])
def test_calibration_with_wrong_static_dims(env: Env, capsys, shape: tuple, fragments: tuple) -> None:
    calib = env.npz("images.npz", x=np.zeros(shape, np.float32))
    refused(env, capsys, [env.cnn(), "--calib", calib, "--ratio", "0.2"], "images.npz", *fragments)


@pytest.mark.parametrize("case,array,fragments", [
    ("complex", lambda d: d.astype(np.complex64), ("'x'", "complex64")),
    ("strings", lambda d: d.astype(str), ("'x'", "<U")),
    ("nan", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 77, np.nan, d).astype(np.float32), ("'x'", "NaN")),
    ("inf", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 5, -np.inf, d).astype(np.float32), ("'x'", "Inf")),
    ("one_sample", lambda d: d[:1], ("at least 2",)),
    ("no_samples", lambda d: d[:0], ("at least 2",)),
])
def test_calibration_values_refused(env: Env, capsys, case: str, array, fragments: tuple) -> None:
    calib = env.npz(f"{case}.npz", x=array(env.data))
    refused(env, capsys, [env.model, "--calib", calib, "--ratio", "0.2"], f"{case}.npz", *fragments)


def test_calibration_values_that_overflow_the_model_dtype(env: Env) -> None:
    """float64 values beyond float32's range: one clean line that says the values do not fit
    the model's float32, and no numpy RuntimeWarning on stderr (run as a real process: pytest
    would swallow the warning)."""
    calib = env.npz("huge.npz", x=env.data.astype(np.float64) * 1e300)
    before = snapshot(env)
    result = subprocess.run([sys.executable, "-m", "onnxprune", str(env.model), "--calib", str(calib), "--ratio", "0.2", "-o", str(env.result)],
                            capture_output=True, text=True, timeout=120)
    line = error_line(result.returncode, result.stdout, result.stderr, "'x'", "huge.npz")
    assert "float32" in line or "overflow" in line, line
    assert snapshot(env) == before


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_object_arrays_are_refused(env: Env, capsys, suffix: str) -> None:
    path = env.src / f"objects{suffix}"
    data = env.data.astype(object)
    if suffix == ".npz":
        np.savez(path, x=data)
    else:
        np.save(path, data, allow_pickle=True)
    line = refused(env, capsys, [env.model, "--calib", path, "--ratio", "0.2"], path.name)
    assert "object" in line.lower()


def test_calibration_key_mismatch_with_several_inputs(env: Env, capsys) -> None:
    """Two graph inputs: a bare .npy is ambiguous; arrays with different sample counts are refused."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 6], rng.standard_normal(48).astype(np.float32).tolist())
    v = helper.make_tensor("v", TensorProto.FLOAT, [6, 3], rng.standard_normal(18).astype(np.float32).tolist())
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add"), helper.make_node("MatMul", ["s", "w"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "v"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "two_inputs", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w, v])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = env.src / "two.onnx"
    onnx.save(model, str(path))
    bare = env.src / "bare.npy"
    np.save(bare, rng.standard_normal((40, 8)).astype(np.float32))
    refused(env, capsys, [path, "--calib", bare, "--ratio", "0.2"], "bare.npy", "a", "b")
    uneven = env.npz("uneven.npz", a=rng.standard_normal((40, 8)).astype(np.float32), b=rng.standard_normal((30, 8)).astype(np.float32))
    refused(env, capsys, [path, "--calib", uneven, "--ratio", "0.2"], "uneven.npz", "30", "40")


# -- warnings, not errors ---------------------------------------------------------------------
def test_extra_calibration_arrays_warn_and_succeed(env: Env, capsys) -> None:
    calib = env.npz("extra.npz", x=env.data, labels=np.arange(120), y=env.data)
    err, _ = succeeded(env, capsys, [env.model, "--calib", calib, "--ratio", "0.2"])
    lines = warnings_in(err)
    assert len(lines) == 1 and "labels" in lines[0] and "y" in lines[0] and "extra.npz" in lines[0], lines


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float64, np.float16])
def test_safe_casts_warn_and_succeed(env: Env, capsys, dtype) -> None:
    calib = env.npz("cast.npz", x=(env.data * 10).astype(dtype))
    err, _ = succeeded(env, capsys, [env.model, "--calib", calib, "--ratio", "0.2"])
    lines = warnings_in(err)
    assert len(lines) == 1, lines
    assert "cast" in lines[0] and np.dtype(dtype).name in lines[0] and "float32" in lines[0] and "'x'" in lines[0], lines[0]


def test_fewer_samples_than_units_everywhere_is_refused_with_the_number_needed(env: Env, capsys) -> None:
    """12 samples (11 for calibration, 1 held out) for layers of 24 and 12 units: with fewer rows
    than units a unit looks redundant only because it was not observed, so nothing is pruned."""
    calib = env.npz("few.npz", x=env.data[:12])
    refused(env, capsys, [env.model, "--calib", calib, "--ratio", "0.2"], "11 calibration samples", "25 rows needed")


def test_an_undersampled_space_is_pinned_and_the_rest_pruned(env: Env, capsys) -> None:
    """20 samples (18 for calibration, 2 held out): the 24-unit layer cannot be judged and is pinned with the
    number needed; the 12-unit layer is pruned with a warning that its statistics are thin."""
    calib = env.npz("few.npz", x=env.data[:20])
    err, pruned = succeeded(env, capsys, [env.model, "--calib", calib, "--ratio", "0.1"])
    lines = warnings_in(err)
    assert any("18 rows for 24 units" in line and "not pruned" in line for line in lines), lines
    assert any("18 rows for 12 units" in line and "warning: 1 site saw" in line and "so its statistics are noisy" in line for line in lines), lines
    assert np.isfinite(run(pruned, env.data[:5])).all()


# -- the output path --------------------------------------------------------------------------
def test_output_folder_does_not_exist(env: Env, capsys) -> None:
    missing = env.out / "not" / "there"
    refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], str(missing), "does not exist", output=missing / "m.onnx")


def test_output_folder_is_a_file(env: Env, capsys) -> None:
    refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], str(env.calib), output=env.calib / "m.onnx")


def test_output_path_is_an_existing_folder(env: Env, capsys) -> None:
    """-o names a folder: a one-line error (exit 2) that names it, not an internal error."""
    folder = env.out / "models"
    folder.mkdir()
    before = snapshot(env)
    code, out, err = cli([env.model, "--calib", env.calib, "--ratio", "0.2", "-o", folder], capsys)
    error_line(code, out, err, str(folder))
    assert snapshot(env) == before


def test_output_folder_not_writable(env: Env, capsys) -> None:
    env.out.chmod(0o500)
    try:
        if os.access(env.out, os.W_OK):
            pytest.skip("the output folder stays writable (running as root)")
        refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], str(env.out), "not writable")
    finally:
        env.out.chmod(0o700)


def test_report_in_a_missing_folder_is_refused_before_writing_the_model(env: Env, capsys) -> None:
    """--report into a folder that does not exist: exit 2 naming the report path, and no
    pruned model left behind (the report path is checked before anything is written)."""
    report = env.out / "no_such_folder" / "report.json"
    refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2", "--report", report], str(report))


def test_overwrite_replaces_the_file_by_rename(env: Env, capsys) -> None:
    """--overwrite succeeds and replaces the input by renaming a complete file over it: a hard
    link made before the run still sees the original bytes (nothing was written in place)."""
    before = digest(env.model)
    keep = env.src / "original.onnx"
    os.link(env.model, keep)
    code, out, err = cli([env.model, "--calib", env.calib, "--ratio", "0.2", "-o", env.model, "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert digest(keep) == before and digest(env.model) != before
    onnx.checker.check_model(onnx.load(str(env.model)), full_check=True)
    assert sorted(p.name for p in env.src.iterdir()) == ["calib.npz", "net.onnx", "original.onnx"]


def test_overwrite_is_atomic_when_the_write_fails(env: Env, capsys, monkeypatch) -> None:
    """--overwrite: if writing the new model fails half way, the input model is still intact."""
    before = digest(env.model)

    def disk_full(fd) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    code, out, err = cli([env.model, "--calib", env.calib, "--ratio", "0.2", "-o", env.model, "--overwrite"], capsys)
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert digest(env.model) == before
    onnx.checker.check_model(onnx.load(str(env.model)), full_check=True)
    assert sorted(p.name for p in env.src.iterdir()) == ["calib.npz", "net.onnx"]  # no staging folder left


def test_write_failure_is_a_user_error_naming_the_output(env: Env, capsys, monkeypatch) -> None:
    """A full disk while writing: one line, exit 2, the output path named; nothing left behind."""

    def disk_full(fd) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], str(env.result))


def test_symlink_to_the_input_as_output_needs_overwrite(env: Env, capsys) -> None:
    link = env.out / "link.onnx"
    link.symlink_to(env.model)
    before = digest(env.model)
    code, out, err = cli([env.model, "--calib", env.calib, "--ratio", "0.2", "-o", link], capsys)
    error_line(code, out, err, "--overwrite")
    assert digest(env.model) == before and link.is_symlink()


# -- targets and options ----------------------------------------------------------------------
@pytest.mark.parametrize("args,fragments", [
    (["--ratio", "-0.1"], ("--ratio", "-0.1")),
    (["--ratio", "1"], ("--ratio",)),
    (["--ratio", "nan"], ("--ratio", "nan")),
    (["--ratio", "inf"], ("--ratio", "inf")),
    (["--flops", "1"], ("--flops",)),
    (["--flops", "-0.5"], ("--flops", "-0.5")),
    (["--params", "1.2"], ("--params", "1.2")),
    (["--tolerance", "2"], ("--tolerance", "2")),
    (["--tolerance", "-1"], ("--tolerance", "-1")),
    (["--min-keep", "0"], ("--min-keep",)),
    (["--round-to", "-8"], ("--round-to",)),
    (["--calib-samples", "1"], ("--calib-samples",)),
    (["--ratio", "0.2", "--tolerance", "0.1"], ("--tolerance", "--ratio")),
    (["--params", "0.2", "--flops", "0.1"], ("--flops", "--params")),
])
def test_target_and_option_errors(env: Env, capsys, args: list, fragments: tuple) -> None:
    refused(env, capsys, [env.model, "--calib", env.calib, *args], *fragments)


def test_conflicting_targets_in_the_api(env: Env) -> None:
    with pytest.raises(onnxprune.TargetError, match="--ratio and --flops"):
        onnxprune.prune(str(env.model), str(env.calib), ratio=0.2, flops=0.2)
    with pytest.raises(onnxprune.TargetError, match="--ratio"):
        onnxprune.prune(str(env.model), str(env.calib), ratio=1.5)
    assert list(env.out.iterdir()) == []


def test_api_calibration_dict_with_a_list(env: Env) -> None:
    """`calib` as a dict whose value is a nested list, not an ndarray: either used as an array
    or refused with a CalibrationError, never an AttributeError from inside onnxprune."""
    try:
        model, _ = onnxprune.prune(str(env.model), {"x": env.data.tolist()}, ratio=0.2)
    except onnxprune.CalibrationError as exc:
        assert "'x'" in str(exc)
    else:
        onnx.checker.check_model(model, full_check=True)


# -- security: nothing in the calibration data is executed ------------------------------------
class _Payload:
    """Unpickling this creates a marker file (what a malicious .npz could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("container", ["npz", "npy", "raw_pickle"])
def test_pickled_payload_is_not_executed(env: Env, capsys, container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.array([_Payload(marker), 1.0], dtype=object)
    path = env.src / ("evil.npy" if container == "npy" else "evil.npz")
    if container == "npz":
        np.savez(path, x=payload)
    elif container == "npy":
        np.save(path, payload, allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps({"x": payload}))
    refused(env, capsys, [env.model, "--calib", path, "--ratio", "0.2"], "evil")
    assert not marker.exists(), "onnxprune unpickled the calibration file and ran its payload"
    # the payload is real: loading the same file unsafely does run it
    if container == "raw_pickle":
        pickle.loads(path.read_bytes())
    else:
        loaded = np.load(path, allow_pickle=True)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            loaded["x"]
            loaded.close()
    assert marker.exists()


# -- failures in the middle of a run leave nothing behind -------------------------------------
def test_failure_during_rewrite_leaves_no_files(env: Env, capsys, monkeypatch) -> None:
    def broken_rewrite(*args, **kwargs):
        raise RuntimeError("rewrite blew up")

    monkeypatch.setattr(onnxprune.api, "rewrite", broken_rewrite)
    monkeypatch.setattr(onnxprune.refit, "rewrite", broken_rewrite)  # the sequential fit's models
    line = refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], "rewrite blew up", "--debug", exit_code=1)
    assert line.startswith("onnxprune: internal error: RuntimeError")


def test_interrupt_during_calibration_leaves_no_files(env: Env, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxprune.preparation, "collect_stats", interrupted)
    refused(env, capsys, [env.model, "--calib", env.calib, "--ratio", "0.2"], "interrupted", exit_code=130)


def test_onnxruntime_failure_during_calibration_leaves_no_files(env: Env, capsys) -> None:
    """A model with a static batch of 4 and 30 samples (27 for calibration): the last batch
    does not fit. Either it works, or the one-line error says which batch size is needed."""
    model = onnx.load(str(env.model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    path = env.src / "batch4.onnx"
    onnx.save(model, str(path))
    calib = env.npz("thirty.npz", x=env.data[:30])
    before = snapshot(env)
    code, out, err = cli([path, "--calib", calib, "--ratio", "0.2", "-o", env.result, "-q"], capsys)
    if code == 0:
        onnx.checker.check_model(onnx.load(str(env.result)), full_check=True)
        return
    error_line(code, out, err, "4", "batch")
    assert snapshot(env) == before


def test_debug_prints_a_traceback(env: Env, capsys) -> None:
    calib = env.npz("nan.npz", x=np.full((20, 16), np.nan, np.float32))
    code, out, err = cli([env.model, "--calib", calib, "--ratio", "0.2", "-o", env.result, "--debug"], capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("onnxprune: error: ") and "NaN" in err.splitlines()[-1]
    assert list(env.out.iterdir()) == []
