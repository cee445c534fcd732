"""Issue 3: every reference-zoo architecture, from both torch exporters (and the Keras models from
tf2onnx with and without its optimiser, issue 14), prunes to a valid model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import run

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())
FILES = sorted(p.name for p in ZOO.glob("*.onnx"))


KERAS = {"keras_cnn", "keras_mixer"}  # NHWC, models/build_zoo_keras.py


def calib_for(name: str) -> Path:
    return ZOO / MANIFEST["files"][name]["calib"]


def fresh_inputs(name: str, n: int = 4) -> np.ndarray:
    shape = np.load(calib_for(name))["input"].shape[1:]
    return np.random.default_rng(99).normal(size=(n, *shape)).astype(np.float32)


def test_zoo_has_every_architecture_from_both_exporters():
    stems = {f.split(".")[0] for f in FILES}
    assert {"resnet18s", "resnet50s", "mobilenetv2s", "densenets", "resnexts", "effnets", "c2f", "unets"} | KERAS <= stems
    for stem in stems - {"keras_crnn"}:  # tf2onnx writes its GRU validly only with the optimiser
        kinds = ("tf2onnx", "tf2onnx_noopt") if stem in KERAS else ("ts", "dynamo")
        assert all(f"{stem}.{kind}.onnx" in FILES for kind in kinds), stem
        assert all(f"{stem}.{kind}.onnx" in MANIFEST["files"] for kind in kinds), stem


@pytest.mark.parametrize("name", FILES)
def test_ratio_0_3_gives_a_valid_smaller_model(name):
    original = onnx.load(ZOO / name)
    model, report = onnxprune.prune(ZOO / name, calib_for(name), ratio=0.3)
    onnx.checker.check_model(model, full_check=True)
    x = fresh_inputs(name)
    before, after = run(original, x), run(model, x)
    assert after.shape == before.shape
    assert np.isfinite(after).all()
    assert report.macs_after < report.macs_before
    assert report.params_after < report.params_before
    assert report.units_after < report.units_before


@pytest.mark.parametrize("name", FILES)
def test_ratio_0_is_bit_identical(name):
    original = onnx.load(ZOO / name)
    model, report = onnxprune.prune(ZOO / name, calib_for(name), ratio=0.0)
    x = fresh_inputs(name)
    assert np.array_equal(run(original, x), run(model, x))
    assert report.macs_after == report.macs_before


@pytest.mark.parametrize("stem", ["resnet18s", "mobilenetv2s", "densenets", "effnets", "unets", "c2f", "yolov8s"])
def test_both_exporters_find_the_same_prunable_units(stem):
    """TorchScript and torch.export graphs differ (BN folded, Flatten vs Reshape, Split vs Slice),
    yet the architecture's prunable unit count is the same, except where a pattern is pinned."""
    units = {}
    for exporter in ("ts", "dynamo"):
        report = onnxprune.inspect_model(ZOO / f"{stem}.{exporter}.onnx")
        units[exporter] = sum(s.units for s in report.spaces if not s.pinned)
    assert units["ts"] == units["dynamo"]  # C2f too: TorchScript's computed chunk point is read (issue 14)


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_yolov8_pins_only_the_detect_outputs_and_the_dfl_layout(exporter):
    """Issue 14: every C2f, SPPF, neck and head conv is prunable; what stays is the last 1x1 conv
    of each box branch (4 x 16 DFL bins), of each class branch (the graph output) and the DFL's
    fixed conv."""
    spaces = onnxprune.inspect_model(ZOO / f"yolov8s.{exporter}.onnx").spaces
    pinned = sorted(s.units for s in spaces if s.pinned)
    assert pinned == [1, 4, 4, 4, 10, 10, 10], pinned
    assert len([s for s in spaces if not s.pinned]) == 51


@pytest.mark.parametrize("stem", sorted(KERAS))
def test_nhwc_keras_models_prune_every_unit_but_the_logits_with_and_without_tf2onnx_optimiser(stem):
    """Without its optimiser tf2onnx wraps every Conv in Transposes, keeps BatchNorm as Mul/Add on
    the last axis and Dense as Tensordot (int32 shapes from Shape); both graphs prune the same."""
    found = {}
    for kind in ("tf2onnx", "tf2onnx_noopt"):
        spaces = onnxprune.inspect_model(ZOO / f"{stem}.{kind}.onnx").spaces
        assert [s.pinned for s in spaces if s.pinned] == [["tensor 'output' is a graph output"]], kind
        found[kind] = sorted(s.units for s in spaces if not s.pinned)
    assert found["tf2onnx"] == found["tf2onnx_noopt"]


def test_a_keras_crnn_prunes_its_convs_and_lstm_inputs_and_pins_what_a_gru_loop_reads():
    """tf2onnx writes the bidirectional GRU as a Loop per direction whose body reads the LSTM's
    output from the enclosing graph: the LSTM's hidden units pin (with the Loop named), the rest
    prunes, also the convs whose channels reach a Dense through a channels-last flatten of 8
    heights, and the rewrite keeps what the Loops read."""
    spaces = {s.name: s for s in onnxprune.inspect_model(ZOO / "keras_crnn.tf2onnx.onnx").spaces}
    lstm = next(s for name, s in spaces.items() if name.startswith("LSTM"))
    assert lstm.pinned and all("reads the units inside its subgraph" in reason for reason in lstm.pinned)
    assert sum(not s.pinned for s in spaces.values()) == 3
    model, report = onnxprune.prune(ZOO / "keras_crnn.tf2onnx.onnx", calib_for("keras_crnn.tf2onnx.onnx"), ratio=0.3)
    assert sum(node.op_type == "Loop" for node in model.graph.node) == 2 and report.fidelity[0].relative_l2 < 0.5


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_grouped_convolutions_prune_in_whole_groups(exporter):
    """Issue 14: no grouped Conv of the ResNeXt is pinned; each is a pass-through of a prunable space."""
    path = ZOO / f"resnexts.{exporter}.onnx"
    report = onnxprune.inspect_model(path)
    assert not any("grouped Conv" in r for s in report.spaces for r in s.pinned)
    grouped = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(grouped) == 4
    for name in grouped:
        assert any(name in s.pass_through and not s.pinned for s in report.spaces), name
    assert MANIFEST  # the manifest documents the zoo


def _plant_oracle():
    """tools/plant_oracle.py as a module (tools are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "plant_oracle.py"
    spec = importlib.util.spec_from_file_location("plant_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["resnet18s.ts.onnx", "densenets.dynamo.onnx", "unets.ts.onnx", "keras_cnn.tf2onnx_noopt.onnx"])
def test_planted_copies_are_pruned_exactly(name):
    """A copy of a unit planted in every space (tools/plant_oracle.py) is removed, and the pruned
    model's outputs equal the planted model's on the rows the fit saw and on new ones."""
    row = _plant_oracle().check(ZOO / name, calib_for(name), tolerance=1e-7, sequential="auto", held_out=8)
    assert row["planted"] >= 4 and not row["missed"], row
    assert row["change_calibration"] < 1e-4 and row["change"] < 1e-4, row


def test_plant_oracle_sees_a_fold_left_out(monkeypatch):
    """The oracle's negative control: with the least-squares fold skipped, removing the copies
    changes the outputs."""
    import onnxprune.folds as folds

    monkeypatch.setattr(folds, "fold_consumer_weight",
                        lambda weight, consumer, width, recovery: (weight, np.zeros(weight.shape[consumer.out_axis])))
    row = _plant_oracle().check(ZOO / "resnet18s.ts.onnx", calib_for("resnet18s.ts.onnx"), tolerance=1e-7, sequential=False, held_out=8)
    assert row["change_calibration"] > 1e-2, row
