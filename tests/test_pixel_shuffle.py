"""DepthToSpace (PixelShuffle) and SpaceToDepth (session 21): units flow through them both
ways. A DepthToSpace output channel is r x r channels of its input (a block of them in CRD
mode, one in each of r x r runs in DCR), so the conv before a PixelShuffle is pruned in whole
groups of r x r channels; a planted duplicate is removed exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, initializer, relative_l2, run
from onnxprune.analyse import Site, analyse

RNG = np.random.default_rng(21)
C, R = 4, 2  # DepthToSpace output channels, block size


def normal(*shape, scale=0.5):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def phase_channels(channel: int, mode: str) -> list[int]:
    """The r x r input channels of DepthToSpace output channel `channel`."""
    return [channel * R * R + p for p in range(R * R)] if mode == "CRD" else [p * C + channel for p in range(R * R)]


def with_tail(g: GraphBuilder, h: str, width: int, side: int) -> onnx.ModelProto:
    """h -> ReLU -> 1x1 conv `mix` (width -> 5) -> ReLU -> 1x1 conv `head`: every model's tail here."""
    h = g.op("Relu", [g.conv(g.op("Relu", [h]), normal(5, width, 1, 1), normal(5), name="mix")])
    return g.build(g.conv(h, normal(2, 5, 1, 1), normal(2), name="head"), ["N", 2, side, side])


def pruned_without_the_copy(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """Pruned at tolerance 1e-7: space `name` keeps C - 1 of its C units and the outputs on fresh
    inputs are unchanged."""
    x = RNG.normal(size=(48, *shape)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-7, allocation="global")
    row = next(r for r in report.spaces if r.name == name)
    assert (row.kept, row.units) == (C - 1, C), row
    fresh = RNG.normal(size=(4, *shape)).astype(np.float32)
    assert relative_l2(run(model, fresh), run(pruned, fresh)) < 1e-5
    return pruned


def shuffle_model(mode: str, source: int = 1, copy: int = 3) -> onnx.ModelProto:
    """conv (3 -> C x r x r) -> DepthToSpace(r, mode) -> ReLU -> conv (C -> 5) -> ReLU -> conv:
    output channel `copy` of the DepthToSpace is a copy of `source` (its r x r filters copied)."""
    w, b = normal(C * R * R, 3, 3, 3), normal(C * R * R)
    w[phase_channels(copy, mode)], b[phase_channels(copy, mode)] = w[phase_channels(source, mode)], b[phase_channels(source, mode)]
    g = GraphBuilder([None, 3, 5, 5])
    h = g.op("DepthToSpace", [g.conv("x", w, b, name="sub_pixel", pads=[1, 1, 1, 1])], name="shuffle", blocksize=R, mode=mode)
    return with_tail(g, h, C, 10)


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_the_conv_before_a_pixel_shuffle_loses_a_copied_output_channel_exactly(mode: str) -> None:
    model = shuffle_model(mode)
    space = next(s for s in analyse(model).spaces if s.name == "sub_pixel")
    assert not space.pinned and space.n == C, space.pinned
    pruned = pruned_without_the_copy(model, "sub_pixel", (3, 5, 5))
    assert initializer(pruned, "sub_pixel", 1).shape[0] == (C - 1) * R * R
    assert initializer(pruned, "mix", 1).shape[1] == C - 1


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_a_pixel_shuffle_reached_from_its_output_couples_the_conv_before_it(mode: str) -> None:
    """skip = conv_b (C channels at the high resolution, listed first) is added to the shuffled
    sub-pixel conv: its space reaches the DepthToSpace from the output, and the conv before it
    joins as a producer of r x r channels per unit; unit 3 is a copy of unit 1 on both sides."""
    wb, bb = normal(C, 3, 1, 1), normal(C)
    wb[3], bb[3] = wb[1], bb[1]
    g = GraphBuilder([None, 3, 10, 10])
    skip = g.conv("x", wb, bb, name="conv_b")
    w, b = normal(C * R * R, 3, 2, 2), normal(C * R * R)
    w[phase_channels(3, mode)], b[phase_channels(3, mode)] = w[phase_channels(1, mode)], b[phase_channels(1, mode)]
    h = g.op("DepthToSpace", [g.conv("x", w, b, name="sub_pixel", strides=[2, 2])], name="shuffle", blocksize=R, mode=mode)
    model = with_tail(g, g.op("Add", [h, skip]), C, 10)
    space = next(s for s in analyse(model).spaces if s.name == "conv_b")
    assert not space.pinned and space.n == C and set(space.producers) == {"conv_b", "sub_pixel"}, space.pinned
    pruned = pruned_without_the_copy(model, "conv_b", (3, 10, 10))
    assert initializer(pruned, "sub_pixel", 1).shape[0] == (C - 1) * R * R


def test_a_pixel_shuffled_map_is_never_subsampled_in_step_with_its_block_size() -> None:
    """Each phase of a DepthToSpace output is another input channel: a spatial stride of r reads
    one of them only, so the map has period r, like a stride-r ConvTranspose's."""
    from onnxprune.calibrate import phase_periods
    from onnxprune.graph import GraphIndex, static_shapes

    model = shuffle_model("CRD")
    index = GraphIndex(model, static_shapes(model, {"x": (1, 3, 5, 5)}))
    relu = next(n for n in model.graph.node if list(n.input) == ["shuffle_out"])
    site = Site(relu.output[0], 1, C)  # what the conv after the shuffle reads
    assert phase_periods(index, [site]) == {site.tensor: R}


def unshuffle_model(copy: int = 2, source: int = 0) -> onnx.ModelProto:
    """conv (3 -> C) -> ReLU -> SpaceToDepth(r) -> conv (C x r x r -> 5) -> ReLU -> conv, with
    channel `copy` of the first conv a copy of `source`: it reaches the next conv r x r times."""
    w, b = normal(C, 3, 3, 3), normal(C)
    w[copy], b[copy] = w[source], b[source]
    g = GraphBuilder([None, 3, 6, 6])
    h = g.op("SpaceToDepth", [g.op("Relu", [g.conv("x", w, b, name="stem", pads=[1, 1, 1, 1])])], name="unshuffle", blocksize=R)
    return with_tail(g, h, C * R * R, 3)


def test_space_to_depth_carries_every_unit_block_size_squared_times_and_a_copy_goes_exactly() -> None:
    model = unshuffle_model()
    space = next(s for s in analyse(model).spaces if s.name == "stem")
    assert not space.pinned and space.n == C and space.tensors[space.sites[0]].repeats == R * R, space.pinned
    pruned = pruned_without_the_copy(model, "stem", (3, 6, 6))
    assert initializer(pruned, "mix", 1).shape[1] == (C - 1) * R * R


def test_space_to_depth_reached_from_its_output_makes_each_run_of_channels_one_unit() -> None:
    """skip = conv_b (C x r x r channels at the low resolution, listed first) is added to
    SpaceToDepth(conv_a): its channels k x C + c, one per run, are one unit with conv_a's channel
    c; channel 2 of conv_a and its r x r partners in conv_b are copies of channel 0's."""
    wb, bb = normal(C * R * R, 3, 2, 2), normal(C * R * R)
    wa, ba = normal(C, 3, 3, 3), normal(C)
    wa[2], ba[2] = wa[0], ba[0]
    for k in range(R * R):
        wb[k * C + 2], bb[k * C + 2] = wb[k * C], bb[k * C]
    g = GraphBuilder([None, 3, 6, 6])
    skip = g.conv("x", wb, bb, name="conv_b", strides=[2, 2])
    a = g.op("SpaceToDepth", [g.conv("x", wa, ba, name="conv_a", pads=[1, 1, 1, 1])], name="unshuffle", blocksize=R)
    model = with_tail(g, g.op("Add", [a, skip]), C * R * R, 3)
    space = next(s for s in analyse(model).spaces if s.name == "conv_b")
    assert not space.pinned and space.n == C and set(space.producers) == {"conv_b", "conv_a"}, space.pinned
    pruned = pruned_without_the_copy(model, "conv_b", (3, 6, 6))
    assert initializer(pruned, "conv_a", 1).shape[0] == C - 1 and initializer(pruned, "conv_b", 1).shape[0] == (C - 1) * R * R


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
def test_a_pixel_shuffle_into_the_graph_output_stays_pinned_with_the_reason(mode: str) -> None:
    g = GraphBuilder([None, 3, 5, 5])
    h = g.conv("x", normal(C * R * R, 3, 3, 3), normal(C * R * R), name="sub_pixel", pads=[1, 1, 1, 1])
    model = g.build(g.op("DepthToSpace", [h], name="shuffle", blocksize=R, mode=mode), ["N", C, 10, 10])
    space = next(s for s in analyse(model).spaces if s.name == "sub_pixel")
    assert space.pinned == ["tensor 'shuffle_out' is a graph output"]


def test_a_dcr_shuffle_of_two_convs_side_by_side_pins_the_units_it_mixes() -> None:
    """DCR output channel c is channels c, C + c, 2C + c, 3C + c of its input: with two convs of
    2C channels side by side, every output channel holds units of both, which no space can remove."""
    g = GraphBuilder([None, 3, 5, 5])
    halves = [g.conv("x", normal(2 * C, 3, 1, 1), normal(2 * C), name=f"half_{i}") for i in range(2)]
    h = g.op("DepthToSpace", [g.op("Concat", halves, axis=1)], name="shuffle", blocksize=R, mode="DCR")
    model = g.build(g.conv(h, normal(2, C, 1, 1), normal(2), name="head"), ["N", 2, 10, 10])
    spaces = {s.name: s for s in analyse(model).spaces}
    assert spaces["half_0"].pinned == ["DepthToSpace 'shuffle' mixes these units with other channels in one output channel"]
