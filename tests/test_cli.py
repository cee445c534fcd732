"""The command line: outputs, reports, one-line errors with exit code 2, nothing left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import cli, random_mlp, run


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A small MLP (input x[16]) and its calibration data in a fresh folder."""
    model = random_mlp(widths=(16, 24, 12, 4), seed=2)
    path = tmp_path / "net.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((120, 16)).astype(np.float32))
    return {"model": path, "calib": calib, "dir": tmp_path}


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines}"
    assert lines[0].startswith("onnxprune: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_run_writes_the_model_and_the_report(files, capsys) -> None:
    out, report = files["dir"] / "small.onnx", files["dir"] / "report.json"
    before = digest(files["model"])
    code, stdout, err = cli([files["model"], "--calib", files["calib"], "-o", out, "--ratio", "0.3", "--report", report], capsys)
    assert code == 0, err
    assert digest(files["model"]) == before  # the input is never modified
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["target"] == {"ratio": 0.3} and data["method"] == "snp"
    assert data["units_before"] == 36 and data["units_after"] <= 36 - 0.3 * 36
    assert data["macs_after"] < data["macs_before"] and data["params_after"] < data["params_before"]
    assert [s["units"] for s in data["spaces"]] == [24, 12, 4]
    assert data["fidelity"][0]["relative_l2"] >= 0
    assert "wrote" in stdout and str(out) in stdout.replace("\n", "")  # the table and where it went
    assert listing(files["dir"]) == {"net.onnx", "calib.npz", "small.onnx", "report.json"}  # no temp files
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    assert run(pruned, x).shape == (5, 4)


def test_default_output_name(files, capsys) -> None:
    code, _, err = cli([files["model"], "--calib", files["calib"], "--ratio", "0.2", "-q"], capsys)
    assert code == 0, err
    assert (files["dir"] / "net.pruned.onnx").is_file()
    onnx.checker.check_model(onnx.load(str(files["dir"] / "net.pruned.onnx")), full_check=True)


def test_quiet_prints_nothing_on_stdout(files, capsys) -> None:
    code, stdout, err = cli([files["model"], "--calib", files["calib"], "-o", files["dir"] / "q.onnx", "--ratio", "0.2", "-q"], capsys)
    assert code == 0, err
    assert stdout == ""
    assert (files["dir"] / "q.onnx").is_file()


def test_bare_npy_calibration_for_a_single_input_model(files, capsys) -> None:
    npy = files["dir"] / "calib.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32))
    code, _, err = cli([files["model"], "--calib", npy, "-o", files["dir"] / "n.onnx", "--ratio", "0.2", "-q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("args,fragment", [
    (["--ratio", "0.2", "--flops", "0.2"], "not allowed with"),  # two targets
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "abc"], "abc"),
    (["--method", "magic"], "magic"),
    (["--order", "sideways"], "sideways"),
    (["--round-to", "0"], "round-to"),
    (["--batch-size", "0"], "batch-size"),
    (["--verify-samples", "500"], "verify-samples"),
])
@pytest.mark.parametrize("quiet", [True, False])
def test_argument_errors(files, capsys, args: list[str], fragment: str, quiet: bool) -> None:
    out = files["dir"] / "o.onnx"
    code, stdout, err = cli([files["model"], "--calib", files["calib"], "-o", out, *args, *(["-q"] if quiet else [])], capsys)
    assert_one_error_line(code, err, fragment)
    assert not out.exists()
    assert listing(files["dir"]) == {"net.onnx", "calib.npz"}


def test_missing_calib_option(files, capsys) -> None:
    code, _, err = cli([files["model"], "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err, "--calib")
    assert listing(files["dir"]) == {"net.onnx", "calib.npz"}


def _bad_inputs(files: dict[str, Path]) -> dict[str, tuple[list, str]]:
    folder = files["dir"]
    garbage = folder / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff\x17 at all" * 10)
    wrong_key = folder / "wrong_key.npz"
    np.savez(wrong_key, input=np.zeros((20, 16), np.float32))
    wrong_rank = folder / "wrong_rank.npz"
    np.savez(wrong_rank, x=np.zeros((20, 4, 4), np.float32))
    wrong_width = folder / "wrong_width.npz"
    np.savez(wrong_width, x=np.zeros((20, 15), np.float32))
    not_npz = folder / "text.npz"
    not_npz.write_text("hello")
    return {
        "missing_model": ([folder / "nope.onnx", "--calib", files["calib"]], "nope.onnx"),
        "model_is_a_folder": ([folder, "--calib", files["calib"]], str(folder)),
        "not_onnx": ([garbage, "--calib", files["calib"]], "garbage.onnx"),
        "missing_calib_file": ([files["model"], "--calib", folder / "none.npz"], "none.npz"),
        "calib_not_npz": ([files["model"], "--calib", not_npz], "text.npz"),
        "calib_missing_input_key": ([files["model"], "--calib", wrong_key], "'x'"),
        "calib_wrong_rank": ([files["model"], "--calib", wrong_rank], "rank"),
        "calib_wrong_width": ([files["model"], "--calib", wrong_width], "15"),
    }


@pytest.mark.parametrize("case", ["missing_model", "model_is_a_folder", "not_onnx", "missing_calib_file", "calib_not_npz",
                                  "calib_missing_input_key", "calib_wrong_rank", "calib_wrong_width"])
def test_input_errors_are_one_line_and_leave_nothing(files, capsys, case: str) -> None:
    argv, fragment = _bad_inputs(files)[case]
    before = listing(files["dir"])
    out = files["dir"] / "result.onnx"
    code, _, err = cli([*argv, "-o", out, "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err, fragment)
    assert not out.exists()
    assert listing(files["dir"]) == before  # no output, no temporary file


def test_default_output_not_written_on_error(files, capsys) -> None:
    wrong = files["dir"] / "bad.npz"
    np.savez(wrong, x=np.zeros((20, 3), np.float32))
    code, _, err = cli([files["model"], "--calib", wrong, "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err)
    assert not (files["dir"] / "net.pruned.onnx").exists()


def test_output_folder_missing(files, capsys) -> None:
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", files["dir"] / "no" / "such" / "m.onnx", "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err)


def test_output_equal_to_input_needs_overwrite(files, capsys, monkeypatch) -> None:
    before = digest(files["model"])
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", files["model"], "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err, "--overwrite")
    assert digest(files["model"]) == before
    # the same file under another spelling of the path is refused too (absolute input, relative output)
    monkeypatch.chdir(files["dir"])
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", "net.onnx", "--ratio", "0.2"], capsys)
    assert_one_error_line(code, err, "--overwrite")
    assert digest(files["model"]) == before
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", files["model"], "--ratio", "0.2", "--overwrite", "-q"], capsys)
    assert code == 0, err
    assert digest(files["model"]) != before
    onnx.checker.check_model(onnx.load(str(files["model"])), full_check=True)
    assert listing(files["dir"]) == {"net.onnx", "calib.npz"}


def test_unreachable_target_is_a_one_line_error(files, capsys) -> None:
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", files["dir"] / "u.onnx", "--flops", "0.99"], capsys)
    assert_one_error_line(code, err, "cannot be reached")
    assert not (files["dir"] / "u.onnx").exists()


def test_console_entry_point(files) -> None:
    out = files["dir"] / "sub.onnx"
    ok = subprocess.run([sys.executable, "-m", "onnxprune", str(files["model"]), "--calib", str(files["calib"]), "-o", str(out), "--ratio", "0.3"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and "wrote" in ok.stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    bad = subprocess.run([sys.executable, "-m", "onnxprune", str(files["dir"] / "missing.onnx"), "--calib", str(files["calib"]), "-q"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("onnxprune: error: ") and bad.stderr.count("\n") == 1 and bad.stdout == ""


@pytest.mark.parametrize("quiet", [True, False])
def test_error_output_is_exactly_one_line(files, quiet: bool) -> None:
    """The whole of stderr is the one error line, with or without -q (no blank line left by the
    progress display when stderr is not a terminal)."""
    wrong_rank = files["dir"] / "wrong_rank.npz"
    np.savez(wrong_rank, x=np.zeros((20, 4, 4), np.float32))
    for argv in ([files["dir"] / "missing.onnx", "--calib", files["calib"]], [files["model"], "--calib", wrong_rank, "--ratio", "0.2"]):
        result = subprocess.run([sys.executable, "-m", "onnxprune", *map(str, argv), *(["-q"] if quiet else [])],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.startswith("onnxprune: error: "), repr(result.stderr[:80])
        assert result.stderr.count("\n") == 1, repr(result.stderr)


def test_exclude_pins_a_layer(files, capsys) -> None:
    report = files["dir"] / "r.json"
    code, _, err = cli([files["model"], "--calib", files["calib"], "-o", files["dir"] / "e.onnx", "--ratio", "0.3", "--exclude", "fc1",
                        "--report", report, "-q"], capsys)
    assert code == 0, err
    spaces = {s["name"]: s for s in json.loads(report.read_text())["spaces"]}
    assert spaces["fc1"]["kept"] == spaces["fc1"]["units"] == 24
    assert any("exclude" in reason for reason in spaces["fc1"]["pinned"])
    assert spaces["fc2"]["pinned"] == [] and spaces["fc2"]["kept"] == 12 - 4  # 30% of the 12 prunable units, rounded up


def test_report_samples_from_the_cli(files, capsys) -> None:
    """--report-samples reaches the run (and the stats subcommand accepts it, to match)."""
    out, report = files["dir"] / "small.onnx", files["dir"] / "report.json"
    code, stdout, err = cli([files["model"], "--calib", files["calib"], "-o", out, "--ratio", "0.3", "--report", report,
                             "--report-samples", "20"], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["fidelity_independent"] and data["verification_samples"] == 20
    assert "no choice of the run read" in stdout.replace("\n", " ")
    stats = files["dir"] / "stats.npz"
    code, _, err = cli(["stats", files["model"], "--calib", files["calib"], "-o", stats, "--report-samples", "20"], capsys)
    assert code == 0 and stats.exists(), err
