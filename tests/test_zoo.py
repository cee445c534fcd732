"""Issue 3: every reference-zoo architecture, from both torch exporters, prunes to a valid model."""

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


def calib_for(name: str) -> Path:
    return ZOO / ("calib64.npz" if name.startswith("unets") else "calib.npz")


def fresh_inputs(name: str, n: int = 4) -> np.ndarray:
    shape = np.load(calib_for(name))["input"].shape[1:]
    return np.random.default_rng(99).normal(size=(n, *shape)).astype(np.float32)


def test_zoo_has_every_architecture_from_both_exporters():
    stems = {f.split(".")[0] for f in FILES}
    assert {"resnet18s", "resnet50s", "mobilenetv2s", "densenets", "resnexts", "effnets", "c2f", "unets"} <= stems
    for stem in stems:
        assert f"{stem}.ts.onnx" in FILES and f"{stem}.dynamo.onnx" in FILES


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


@pytest.mark.parametrize("stem", ["resnet18s", "mobilenetv2s", "densenets", "effnets", "unets", "c2f"])
def test_both_exporters_find_the_same_prunable_units(stem):
    """TorchScript and torch.export graphs differ (BN folded, Flatten vs Reshape, Split vs Slice),
    yet the architecture's prunable unit count is the same, except where a pattern is pinned."""
    units = {}
    for exporter in ("ts", "dynamo"):
        report = onnxprune.inspect_model(ZOO / f"{stem}.{exporter}.onnx")
        units[exporter] = sum(s.units for s in report.spaces if not s.pinned)
    assert units["ts"] == units["dynamo"]  # C2f too: TorchScript's computed chunk point is read (issue 14)


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
