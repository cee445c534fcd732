"""Issue 6: `--latency F` searches the threshold by timing the rewritten model. The search logic is
tested with a deterministic stand-in for the timer (timed tests would be flaky); one end-to-end
run checks the plumbing with the real timer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxprune
import onnxprune.latency
from builders import cli, random_mlp, run
from onnxprune.cost import count_macs
from onnxprune.graph import GraphIndex


def macs_ratio_timer(overhead: float):
    """A fake timer: latency = overhead + (1 - overhead) x MACs ratio of the two sessions' models."""
    models: dict[int, int] = {}
    real_make_session = onnxprune.latency.make_session

    def make_session(model: onnx.ModelProto, **kwargs):
        session = real_make_session(model, **kwargs)
        models[id(session)] = count_macs(GraphIndex(model, onnxprune.graph.static_shapes(model, {"x": (1, 20)})))
        return session

    def ratio(original, candidate, feeds, candidate_feeds=None, rounds=5):
        return overhead + (1 - overhead) * models[id(candidate)] / models[id(original)]

    return make_session, ratio


@pytest.fixture()
def fake_timer(monkeypatch):
    make_session, ratio = macs_ratio_timer(overhead=0.2)
    monkeypatch.setattr(onnxprune.latency, "make_session", make_session)
    monkeypatch.setattr(onnxprune.latency, "latency_ratio", ratio)


def calib(n: int = 256) -> dict:
    return {"x": np.random.default_rng(0).standard_normal((n, 20)).astype(np.float32)}


def test_latency_target_picks_the_smallest_removal_that_meets_it(fake_timer) -> None:
    model = random_mlp(widths=(20, 64, 48, 6))
    pruned, report = onnxprune.prune(model, calib(), latency=0.3)
    assert report.latency["ratio"] <= 0.7
    # with this timer latency 0.7 means MACs ratio 0.625: the plan removes just enough MACs
    assert 0.625 - 0.03 <= report.macs_after / report.macs_before <= 0.625
    assert report.latency["steps"] and report.target == {"latency": 0.3}
    removed = [r for r, m in report.latency["steps"] if m <= 0.7]
    assert min(removed) == pytest.approx(1 - report.macs_after / report.macs_before, abs=1e-3)
    fresh = np.random.default_rng(1).standard_normal((32, 20)).astype(np.float32)
    assert run(pruned, fresh).shape == (32, 6)


def test_unreachable_latency_target_is_a_clear_error(fake_timer) -> None:
    model = random_mlp(widths=(20, 64, 48, 6))
    with pytest.raises(onnxprune.TargetError, match="--latency 0.9 cannot be reached"):
        onnxprune.prune(model, calib(), latency=0.9)  # the fake 20% overhead never goes


def test_latency_target_end_to_end_with_the_real_timer(tmp_path, capsys) -> None:
    """The real timer on a small MLP: the run finishes, the report shows what was measured and
    the chosen candidate's ratio is the one recorded in the search steps."""
    path = tmp_path / "mlp.onnx"
    onnx.save(random_mlp(widths=(20, 256, 256, 6)), path)
    np.savez(tmp_path / "calib.npz", **calib(640))
    report = tmp_path / "r.json"
    code, out, err = cli([path, "--calib", tmp_path / "calib.npz", "--latency", "0.2", "--latency-batch", "16",
                          "--latency-threads", "1", "--round-to", "1", "--report", report], capsys)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["latency"]["batch"] == 16 and data["latency"]["threads"] == 1
    assert data["latency"]["ratio"] in [ratio for _, ratio in data["latency"]["steps"]]
    assert "measured onnxruntime CPU latency" in out
    code, _, err = cli([path, "--calib", tmp_path / "calib.npz", "--latency", "0.2", "--latency-batch", "0"], capsys)
    assert code == 2 and "--latency-batch" in err


def test_auto_chooses_the_rule_of_a_latency_target_at_the_same_fraction_of_the_macs(fake_timer) -> None:
    """With a latency target auto scores its candidates at --flops F, the latency's stand-in, and
    the search times the chosen rule's plans (before: always the global threshold); the report
    says at what the candidates were compared. A tolerance target keeps the global threshold."""
    model = random_mlp(widths=(20, 96, 32, 64, 6), seed=0)
    _, report = onnxprune.prune(model, calib(), latency=0.3)
    chosen = report.allocation["chosen"]
    assert chosen == "tempered" and report.allocation["compared_at"] == "--flops 0.3, the latency target's stand-in"
    assert set(report.allocation["heldout_error"]) == {"global", "stream", "tempered", "uniform"}
    assert "held-out samples at --flops 0.3, the latency target's stand-in" in report.allocation_note()
    kept = [s.kept for s in report.spaces]
    _, fixed = onnxprune.prune(model, calib(), latency=0.3, allocation=chosen)
    _, global_rule = onnxprune.prune(model, calib(), latency=0.3, allocation="global")
    assert kept == [s.kept for s in fixed.spaces] != [s.kept for s in global_rule.spaces]


def test_a_tolerance_sets_the_size_and_auto_spreads_it() -> None:
    """`--tolerance T` removes the MACs the global threshold removes at T; auto compares its
    candidates at that budget and the chosen rule plans it (the report says so), while
    `allocation="global"` keeps the tolerance's own plan. A tolerance that removes nothing
    measures nothing."""
    import re

    model = random_mlp(widths=(20, 96, 32, 64, 6), seed=0)
    _, own = onnxprune.prune(model, calib(), tolerance=0.01, allocation="global", sequential=False)
    removed = 1 - own.macs_after / own.macs_before
    _, report = onnxprune.prune(model, calib(), tolerance=0.01, sequential=False)
    found = re.fullmatch(r"--flops ([\d.]+), what --tolerance 0.01 removes with the global threshold", report.allocation["compared_at"])
    assert found and float(found[1]) == pytest.approx(removed, rel=1e-2) and report.target == {"tolerance": 0.01}
    chosen = report.allocation["chosen"]
    assert chosen != "global" and 1 - report.macs_after / report.macs_before == pytest.approx(removed, abs=0.02)
    _, same = onnxprune.prune(model, calib(), flops=float(found[1]), allocation=chosen, sequential=False)
    assert [s.kept for s in report.spaces] == [s.kept for s in same.spaces] != [s.kept for s in own.spaces]
    _, nothing = onnxprune.prune(random_mlp(widths=(20, 16, 12, 6), seed=0), calib(), tolerance=1e-9, sequential=False)
    assert not nothing.allocation and nothing.macs_after == nothing.macs_before
