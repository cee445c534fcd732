"""Allocation variants and the ZCA order: the uniform planner removes the same fraction of every
space and meets the target; the ZCA score shares an exact copy's energy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from builders import cli, planted_mlp, random_cnn, random_mlp, relative_l2, run
from onnxprune.errors import TargetError
from onnxprune.score import zca_scores


def _calib(widths=(20, 32, 24, 6), n: int = 400) -> tuple[onnx.ModelProto, dict]:
    return random_mlp(widths=widths, seed=4), {"x": np.random.default_rng(1).standard_normal((n, widths[0])).astype(np.float32)}


def test_uniform_allocation_removes_the_same_fraction_everywhere() -> None:
    model, calib = _calib(widths=(20, 40, 40, 20, 6))
    _, report = onnxprune.prune(model, calib, ratio=0.25, allocation="uniform")
    fractions = [1 - row.kept / row.units for row in report.spaces if not row.pinned]
    assert len(fractions) == 3 and all(abs(f - 0.25) < 1e-9 for f in fractions)
    _, global_report = onnxprune.prune(model, calib, ratio=0.25)
    assert global_report.units_after == report.units_after


def test_uniform_allocation_meets_a_macs_target_and_runs() -> None:
    model, calib = _calib()
    pruned, report = onnxprune.prune(model, calib, flops=0.4, allocation="uniform")
    assert 1 - report.macs_after / report.macs_before >= 0.4
    onnx.checker.check_model(pruned, full_check=True)
    x = calib["x"][:20]
    assert relative_l2(run(model, x), run(pruned, x)) < 1.0


def test_uniform_allocation_refuses_a_tolerance_and_unknown_names() -> None:
    model, calib = _calib()
    with pytest.raises(TargetError, match="uniform"):
        onnxprune.prune(model, calib, tolerance=0.01, allocation="uniform")
    with pytest.raises(TargetError, match="allocation"):
        onnxprune.prune(model, calib, ratio=0.2, allocation="fair")


def test_zca_scores_share_the_energy_of_an_exact_copy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20000, 3))
    x = np.hstack([x, x[:, :1]])  # unit 3 copies unit 0
    scores = zca_scores(np.cov(x.T, bias=True))
    np.testing.assert_allclose(scores[[0, 3]], 0.5, atol=0.03)
    np.testing.assert_allclose(scores[[1, 2]], 1.0, atol=0.03)


def test_zca_order_ranks_planted_copies_last() -> None:
    """At the planted count, ZCA's shared-energy score keeps the error far below the variance order's
    (which keeps both copies of a high-variance pair). One-shot: the sequential pass chooses the
    units again and repairs the variance order's choice (both reach the same error)."""
    planted = planted_mlp()
    calib = {"x": planted.inputs(400, seed=1)}
    fresh = planted.inputs(40, seed=2024)
    ratio = planted.total_removable / planted.total_units
    errors = {}
    for order in ("zca", "variance"):
        pruned, report = onnxprune.prune(planted.model, calib, ratio=ratio, order=order, sequential=False)
        assert report.order == order
        errors[order] = relative_l2(run(planted.model, fresh), run(pruned, fresh))
    assert errors["zca"] < 1e-3 and errors["zca"] < errors["variance"] / 10


def test_cli_allocation_and_zca(tmp_path, capsys) -> None:
    out = tmp_path / "m.onnx"
    code, _, _ = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "-o", str(out), "--ratio", "0.3",
                      "--allocation", "uniform", "--order", "zca", "-q"], capsys)
    assert code == 0 and out.exists()
    code, _, stderr = cli(["models/mlp.ts.onnx", "--calib", "models/data/fmnist_calib_flat.npz", "--allocation", "fair"], capsys)
    assert code == 2 and "--allocation" in stderr


def test_tempered_allocation_lies_between_global_and_uniform() -> None:
    """Per space, the tempered fraction removed is between the global and the uniform ones' extremes
    and the target holds; a space's score stays non-increasing, so a suffix is removed."""
    model, calib = _calib(widths=(20, 40, 40, 20, 6))
    reports = {a: onnxprune.prune(model, calib, ratio=0.3, allocation=a).report for a in ("global", "tempered", "uniform")}
    assert all(r.units_after == reports["uniform"].units_after for r in reports.values())
    spread = {a: np.ptp([1 - s.kept / s.units for s in r.spaces if not s.pinned]) for a, r in reports.items()}
    assert spread["uniform"] == 0 and spread["tempered"] <= spread["global"]


def _planner(allocation: str):
    from onnxprune.api import calibration_statistics, prepare
    from onnxprune.cost import build_cost_model
    from onnxprune.plan import make_planner
    from onnxprune.score import score_space

    model, calib = _calib(widths=(20, 40, 40, 20, 6))
    prepared = prepare(model, calib)
    stats = calibration_statistics(prepared)
    analysis, index = prepared.analysis, prepared.index
    scores = {s.id: score_space(s, stats, index) for s in analysis.prunable}
    return make_planner(analysis, scores, build_cost_model(index, analysis), allocation=allocation), analysis


@pytest.mark.parametrize("allocation", ["global", "uniform", "tempered"])
def test_a_gain_protects_a_space_and_the_target_still_holds(allocation: str) -> None:
    """A gain above 1 on one space keeps at least as many of its units; below 1, at most as many;
    every plan still removes the asked fraction of units."""
    from onnxprune.plan import Target

    target = Target("ratio", 0.3)
    base_planner, analysis = _planner(allocation)
    base = base_planner.plan(target)
    sid = analysis.prunable[0].id
    for gain, sign in ((4.0, 1), (0.25, -1)):
        planner, _ = _planner(allocation)
        plan = planner.with_gains({sid: gain}).plan(target)
        assert plan.units_removed >= 0.3 * plan.units_total
        assert sign * (len(plan.spaces[sid].keep) - len(base.spaces[sid].keep)) >= 0
        moved = [len(plan.spaces[s].keep) - len(base.spaces[s].keep) for s in plan.spaces if s != sid]
        assert any(moved) and all(-sign * m >= 0 for m in moved)


def _bert_tiny() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The committed tiny BERT and its calibration tokens (the inputs it reads)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "models" / "transformers"
    model = onnx.load(folder / "bert_tiny.dynamo.onnx")
    names = {i.name for i in model.graph.input}
    return model, {k: v for k, v in np.load(folder / "calib_tokens.npz").items() if k in names}


def _second_call_raises(real, error: Exception):
    """`real`, except that its second call raises `error`."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    return wrapped


def test_head_gain_moves_the_budget_between_heads_and_neurons(capsys) -> None:
    """--head-gain < 1 exposes the attention heads: fewer heads kept, more FFN neurons, the same
    parameter target met, and the pruned model runs in onnxruntime close to the original."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "models" / "transformers"
    model, data = _bert_tiny()
    kept = {}
    for gain in (1.0, 0.25):
        pruned, report = onnxprune.prune(model, data, params=0.3, head_gain=gain, allocation="global")
        assert report.params_after <= 0.7 * report.params_before + 1e-9 * report.params_before
        rows = [s for s in report.spaces if not s.pinned]
        kept[gain] = (sum(s.kept for s in rows if s.units <= 4), sum(s.kept for s in rows if s.units > 4))
        feeds = {k: v[:4] for k, v in data.items()}
        outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                   for m in (model, pruned)]
        assert outputs[0].shape == outputs[1].shape and relative_l2(*outputs) < 0.5
    assert kept[0.25][0] < kept[1.0][0] and kept[0.25][1] > kept[1.0][1]
    with pytest.raises(TargetError, match="head-gain"):
        onnxprune.prune(model, data, params=0.3, head_gain=0.0)
    code, _, err = cli([str(folder / "bert_tiny.dynamo.onnx"), "--calib", str(folder / "calib_tokens.npz"), "--params", "0.3",
                        "--head-gain", "-1"], capsys)
    assert code != 0 and "head-gain" in err


def test_a_failing_auto_candidate_is_skipped_and_named(monkeypatch) -> None:
    """One candidate whose model cannot be run (a rewrite bug) costs that candidate, not the
    run: auto chooses among the others and the report names the failure; if all fail, it raises."""
    import onnxprune.fidelity as fidelity

    original_error = fidelity.ReferenceOutputs.error
    calls = {"n": 0}

    def first_fails(self, model, changes):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("onnxruntime cannot load the pruned model: planted")
        return original_error(self, model, changes)

    monkeypatch.setattr(fidelity.ReferenceOutputs, "error", first_fails)
    model = random_cnn(channels=(3, 16, 24, 8), seed=4)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    _, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, sequential=False)
    assert report.allocation["failed"] == {"global": "RuntimeError: onnxruntime cannot load the pruned model: planted"}
    assert report.allocation["chosen"] != "global"
    assert any("candidate 'global' failed" in w for w in report.warnings)
    monkeypatch.setattr(fidelity.ReferenceOutputs, "error", lambda self, model, changes: (_ for _ in ()).throw(RuntimeError("all")))
    with pytest.raises(RuntimeError, match="all"):
        onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, sequential=False)


def test_an_unreachable_target_names_the_spaces_that_saw_too_few_rows() -> None:
    """When spaces are left unpruned for too few calibration rows, the unreachable-target error
    says more samples are the way out (it blamed pins, --min-keep and --round-to only)."""
    model = random_mlp(widths=(12, 64, 16, 5), seed=2)
    x = np.random.default_rng(0).standard_normal((60, 12)).astype(np.float32)  # fewer rows than the 64 units
    with pytest.raises(TargetError, match="saw too few calibration rows to be pruned .*'fc1'.*more calibration samples"):
        onnxprune.prune(model, {"x": x}, params=0.7, seed=0)


def test_auto_also_tries_its_rule_with_other_head_gains() -> None:
    """Where heads and FFN neurons share the budget, auto scores its chosen rule with head gains
    2 and 8 as well and keeps the lowest held-out error; that plan is the one a fixed rule and
    gain make. An explicit --head-gain, or a model without heads, has no such candidates."""
    from onnxprune.allocate import SEARCHED_HEAD_GAINS

    model, data = _bert_tiny()
    options = dict(params=0.5, sequential=False, seed=0)  # here auto keeps heads x2 (a gain other than the default)
    _, report = onnxprune.prune(model, data, **options)
    errors = report.allocation["heldout_error"]
    rules = [name for name in errors if "heads" not in name]
    searched = [name for name in errors if "heads" in name]
    assert len(searched) == len(SEARCHED_HEAD_GAINS) and len({name.split(" (")[0] for name in searched}) == 1
    assert searched[0].split(" (")[0] in rules
    chosen = report.allocation["chosen"]
    assert errors[chosen] == min(e for e in errors.values() if e is not None)
    rule, _, gain = chosen.partition(" (heads x")
    _, fixed = onnxprune.prune(model, data, allocation=rule, head_gain=float(gain.rstrip(")") or 4), **options)
    assert [s.kept for s in fixed.spaces] == [s.kept for s in report.spaces]

    _, explicit = onnxprune.prune(model, data, head_gain=4.0, **options)
    assert not any("heads" in name for name in explicit.allocation["heldout_error"])
    cnn = random_cnn(channels=(3, 16, 24, 8), seed=4)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    _, plain = onnxprune.prune(cnn, {"x": x}, flops=0.4, seed=0, sequential=False)
    assert not any("heads" in name for name in plain.allocation["heldout_error"])


def test_a_failed_head_gain_search_is_named_like_any_failed_candidate(monkeypatch) -> None:
    """If scoring the chosen rule's other head gains fails, the chosen rule stands and the report
    names the failure as it names a failed candidate ('RuntimeError: <first line>')."""
    import onnxprune.allocate as allocate

    model, data = _bert_tiny()
    monkeypatch.setattr(allocate, "choose_allocation", _second_call_raises(allocate.choose_allocation, RuntimeError("planted\nsecond line")))
    _, report = onnxprune.prune(model, data, params=0.5, sequential=False, seed=0)
    assert "heads" not in report.allocation["chosen"]
    assert list(report.allocation["failed"].values()) == ["RuntimeError: planted"]


def _kept_units(report) -> list[int]:
    return [row.kept for row in report.spaces]


@pytest.fixture
def every_rival(monkeypatch) -> None:
    """The judge's mechanics, on a small random net whose uniform plan is more than RIVAL_MARGIN
    behind auto's choice one-shot: the rival is refitted whatever its margin."""
    import onnxprune.selection as selection

    monkeypatch.setattr(selection, "RIVAL_MARGIN", np.inf)


def test_auto_judges_its_choice_against_uniform_after_both_refits(monkeypatch, every_rival) -> None:
    """Under the sequential fit auto refits its one-shot choice and the uniform plan and keeps
    the lower output error on the calibration and held-out samples; that error is the written
    model's mean KL divergence of its logits over both. `judge="one-shot"` keeps
    the one-shot choice without refitting uniform."""
    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    refitted = report.allocation["refitted"]
    chosen = report.allocation["chosen"]
    assert set(refitted["errors"]) == {chosen, "uniform"} and chosen != "uniform" and refitted["samples"] == 200
    assert refitted["errors"][chosen] <= refitted["errors"]["uniform"]
    ref, got = run(model, x), run(pruned, x)
    lp, lq = (z - np.log(np.exp(z).sum(1, keepdims=True)) for z in (ref.astype(np.float64), got.astype(np.float64)))
    assert refitted["errors"][chosen] == pytest.approx(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)), rel=1e-3)
    assert "after the refit on 200 calibration and held-out samples" in report.allocation_note()

    plain_model, plain = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, judge="one-shot")
    assert "refitted" not in plain.allocation and plain.allocation["chosen"] == chosen
    np.testing.assert_array_equal(run(plain_model, x), got)

    import onnxprune.refitjudge as refitjudge

    calls = iter([1.0, 0.5])  # the chosen refit is judged first, then uniform's: uniform wins
    monkeypatch.setattr(refitjudge.RefitError, "__call__", lambda self, refit: next(calls))
    judged_model, judged = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    assert judged.allocation["chosen"] == "uniform" and judged.allocation["refitted"]["errors"] == {chosen: 1.0, "uniform": 0.5}
    monkeypatch.undo()
    uniform_model, uniform = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, allocation="uniform")
    assert _kept_units(judged) == _kept_units(uniform) != _kept_units(report)
    np.testing.assert_allclose(run(judged_model, x), run(uniform_model, x), rtol=0, atol=1e-6)
    with pytest.raises(TargetError, match="unknown judge 'best'"):
        onnxprune.prune(model, {"x": x}, flops=0.4, judge="best")


def test_a_tolerance_judged_after_the_refits_names_its_stand_in(every_rival) -> None:
    """A tolerance's size stands in for the target; when the refit judge decides, the report line
    still says at what budget the candidates were compared."""
    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    _, report = onnxprune.prune(model, {"x": x}, tolerance=0.05, seed=0)
    assert "refitted" in report.allocation
    assert f"one-shot on {report.allocation['samples']} held-out samples at {report.allocation['compared_at']}:" in report.allocation_note()


def test_a_rival_far_behind_one_shot_is_not_refitted() -> None:
    """The uniform plan is refitted beside auto's choice only when its one-shot error is within
    RIVAL_MARGIN of the choice's. Further behind, the run is `judge="one-shot"`'s, one pass, and
    the report says why; within it, both are refitted."""
    import re

    from onnxprune.selection import RIVAL_MARGIN

    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    pruned, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    errors, chosen = report.allocation["heldout_error"], report.allocation["chosen"]
    assert chosen != "uniform" and errors["uniform"] > RIVAL_MARGIN * errors[chosen] and "refitted" not in report.allocation
    found = re.fullmatch(r"uniform not refitted: its one-shot error is ([\d.]+)x the choice's \(more than 1.5x\)", report.allocation["unjudged"])
    assert found and float(found[1]) == pytest.approx(errors["uniform"] / errors[chosen], rel=1e-2)
    assert report.allocation["unjudged"] in report.allocation_note()
    plain, _ = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, judge="one-shot")
    np.testing.assert_array_equal(run(pruned, x), run(plain, x))

    close = random_cnn(channels=(3, 24, 32, 8), seed=1)
    _, judged = onnxprune.prune(close, {"x": x}, flops=0.4, seed=0)
    errors = judged.allocation["heldout_error"]
    assert "uniform" in judged.allocation["refitted"]["errors"] and "unjudged" not in judged.allocation
    assert min(errors.values()) < errors["uniform"] <= RIVAL_MARGIN * min(errors.values())


def test_outside_spread_takes_only_samples_the_spread_batches_leave_out() -> None:
    from onnxprune.data import CalibrationData

    data = CalibrationData({"x": np.arange(100, dtype=np.float32)[:, None]})
    fitted = np.concatenate([batch["x"][:, 0] for batch in data.spread_batches(30, 10)])
    left = data.outside_spread(30, 10, limit=40).arrays["x"][:, 0]
    assert len(left) == len(set(left)) == 40 and not set(left) & set(fitted)
    assert left.min() <= 12 and left.max() >= 87  # spread over what is left, not its first 40
    assert data.outside_spread(0, 10, 40) is None and data.outside_spread(100, 10, 40) is None  # every batch taken
    assert data.outside_spread(30, 10, 40, least=71) is None and data.outside_spread(30, 10, 40, least=70) is not None  # 70 left out


def test_the_refit_judge_compares_on_samples_the_pass_did_not_fit(every_rival) -> None:
    """With more calibration samples than the pass refits on, the finalists are compared on
    samples it left out (and the held-out ones): the error is the written model's there."""
    from onnxprune.api import prepare

    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((700, 3, 8, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, sequential_samples=64)
    refitted = report.allocation["refitted"]
    assert refitted["calibration"] == "unfitted" and refitted["samples"] == 512 + 64
    prepared = prepare(model, {"x": x})
    compared = np.concatenate([prepared.calib_data.outside_spread(64, 32, 512).arrays["x"], prepared.verify_data.read(0, 64)["x"]])
    ref, got = (run(m, compared).astype(np.float64) for m in (model, pruned))
    lp, lq = (z - np.log(np.exp(z).sum(1, keepdims=True)) for z in (ref, got))
    assert refitted["errors"][report.allocation["chosen"]] == pytest.approx(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)), rel=1e-3)
    assert "samples the refit did not fit" in report.allocation_note()


def test_cli_judge_option_reaches_the_run(tmp_path, capsys, every_rival) -> None:
    """`--judge one-shot` keeps auto's one-shot choice (no refit of uniform); the default judges
    the refits and the report's JSON says on what."""
    import json

    model, calib = tmp_path / "net.onnx", tmp_path / "calib.npy"
    onnx.save(random_cnn(channels=(3, 16, 24, 8), seed=0), str(model))
    np.save(calib, np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32))
    reports = {}
    for judge in ("refit", "one-shot"):
        report = tmp_path / f"{judge}.json"
        code, _, err = cli([model, "--calib", calib, "--flops", "0.4", "-o", tmp_path / f"{judge}.onnx", "--judge", judge,
                            "--report", report, "-q"], capsys)
        assert code == 0, err
        reports[judge] = json.loads(report.read_text())["allocation"]
    assert reports["refit"]["refitted"]["calibration"] == "fitted" and "uniform" in reports["refit"]["refitted"]["errors"]
    assert "refitted" not in reports["one-shot"]


def test_a_rival_whose_refit_cannot_be_run_loses_and_is_named(monkeypatch, every_rival) -> None:
    """If onnxruntime cannot run the uniform plan's refit, the chosen plan's refit is written (the
    same model as without the judge) and the report names the failure."""
    import onnxprune.refitjudge as refitjudge

    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    plain, _ = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, judge="one-shot")
    calls = iter([lambda: 1.0, lambda: (_ for _ in ()).throw(RuntimeError("onnxruntime refuses the model: planted"))])
    monkeypatch.setattr(refitjudge.RefitError, "__call__", lambda self, refit: next(calls)())
    pruned, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    refitted = report.allocation["refitted"]
    assert report.allocation["chosen"] != "uniform" and refitted["failed"] == {"uniform": "RuntimeError: onnxruntime refuses the model: planted"}
    assert "uniform" not in refitted["errors"] and "uniform failed" in report.allocation_note()
    assert any("finalist 'uniform' failed" in w for w in report.warnings)
    np.testing.assert_array_equal(run(pruned, x), run(plain, x))


def test_a_rival_whose_refit_raises_loses_and_the_chosen_one_stays(monkeypatch, every_rival) -> None:
    """An error while refitting the rival (not only while running its model) costs the rival only."""
    import onnxprune.refitjudge as refitjudge

    model = random_cnn(channels=(3, 16, 24, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32)
    plain, _ = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0, judge="one-shot")
    monkeypatch.setattr(refitjudge, "refit_or_one_shot", _second_call_raises(refitjudge.refit_or_one_shot, MemoryError("planted")))
    pruned, report = onnxprune.prune(model, {"x": x}, flops=0.4, seed=0)
    assert report.allocation["refitted"]["failed"] == {"uniform": "MemoryError: planted"}
    np.testing.assert_array_equal(run(pruned, x), run(plain, x))
