"""A site written by a spatial mean (an SE block's squeeze, a classifier's global pooling) has
one row per sample; when that is fewer than its units, the recovery of its consumers is fitted
on every position of the pooled input instead of pinning the space."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from builders import GraphBuilder, _normal, relative_l2, run
from onnxprune.analyse import analyse
from onnxprune.api import prepare

C, HW = 24, 8


def se_block(pool: str = "GlobalAveragePool", seed: int = 0):
    """Conv(3->24) -> Relu = h; SE: pool(h) -> Conv(24->6) -> Relu -> Conv(6->24) -> Sigmoid;
    h * s -> Conv(24->5). Channel 7 of h is 2 x channel 3 and has the same gate."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder([None, 3, HW, HW])
    w1 = _normal(rng, (C, 3, 3, 3), 27)
    b1 = (0.1 * rng.random(C)).astype(np.float32)
    w1[7], b1[7] = 2 * w1[3], 2 * b1[3]
    h = g.op("Relu", [g.conv(g.input_name, w1, b1, name="expand", pads=[1, 1, 1, 1])], name="relu")
    if pool == "GlobalAveragePool":
        pooled = g.op("GlobalAveragePool", [h], name="squeeze_pool")
    else:
        pooled = g.op("ReduceMean", [h], name="squeeze_pool", axes=[2, 3], keepdims=1)  # opset 13: axes attribute
    r = g.op("Relu", [g.conv(pooled, _normal(rng, (6, C, 1, 1), C), np.zeros(6, np.float32), name="se_reduce")])
    w3 = _normal(rng, (C, 6, 1, 1), 6)
    w3[7] = w3[3]  # the same gate for the copy: (h * s)[7] = 2 (h * s)[3]
    s = g.op("Sigmoid", [g.conv(r, w3, np.ones(C, np.float32), name="se_expand")])
    out = g.conv(g.op("Mul", [h, s]), _normal(rng, (5, C, 1, 1), C), np.zeros(5, np.float32), name="project")
    return g.build(out, ["N", 5, HW, HW])


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "ReduceMean"])
def test_a_duplicate_channel_read_by_an_se_block_goes_with_few_samples(pool: str) -> None:
    """16 calibration samples (16 pooled rows for 24 units): the squeeze site alone would pin the
    space; with the pooled input's 1024 rows the planted copy is removed and the output is unchanged."""
    model = se_block(pool)
    x = np.random.default_rng(1).standard_normal((20, 3, HW, HW)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-5, verify_samples=4, order="pivoted", sequential=False)
    expand = next(row for row in report.spaces if row.name == "expand")
    assert (expand.units, expand.kept) == (C, C - 1), report.spaces
    assert any("16 rows for 24 units" in w and "pooled input" in w for w in report.warnings), report.warnings
    fresh = np.random.default_rng(2).standard_normal((6, 3, HW, HW)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-4


def test_with_enough_samples_the_pooled_site_keeps_its_own_statistics() -> None:
    model = se_block()
    x = np.random.default_rng(1).standard_normal((40, 3, HW, HW)).astype(np.float32)
    _, report = onnxprune.prune(model, {"x": x}, ratio=0.2, verify_samples=4)
    assert not any("pooled input" in w for w in report.warnings)
    assert next(row for row in report.spaces if row.name == "expand").kept < C


def test_the_pooled_input_is_a_statistics_site_only_when_needed() -> None:
    """The analysis records the fallback; preparation switches to it only when the calibration
    samples are too few, so the extra Gram is never computed otherwise."""
    expand = next(s for s in analyse(se_block()).spaces if s.name == "expand")
    (pooled, source), = expand.pooled.items()
    assert source not in expand.sites and pooled in expand.sites
    x = np.zeros((44, 3, HW, HW), np.float32)
    for samples, site in ((20, source), (44, pooled)):  # 16 or 40 calibration samples (4 held out) for 24 units
        prepared = prepare(se_block(), {"x": x[:samples]}, verify_samples=4)
        tensors = {s.tensor for s in prepared.analysis.sites()}
        assert site in tensors and ({source, pooled} - {site}).isdisjoint(tensors)
        assert all(c.site != ({source, pooled} - {site}).pop() for s in prepared.analysis.spaces for c in s.consumers)


def test_inspect_says_how_many_samples_each_space_needs(capsys) -> None:
    """The SE squeeze alone would need 25 samples for 24 channels; its pooled input (64 positions
    per sample) needs 1, so the space needs 1; the SE's own 6 units are read after pooling: 7."""
    report = onnxprune.inspect_model(se_block())
    needed = {s.name: s.samples_needed for s in report.spaces}
    assert needed["expand"] == 1 and needed["se_reduce"] == 7, needed
    report.render()
    assert "at least 7 samples" in capsys.readouterr().out
