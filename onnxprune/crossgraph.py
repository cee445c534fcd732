"""In-graph cross moments for the sequential pass: the pruned segment's session also takes the
original model's (sampled) activation at each measured site and computes x~^T x~, x~^T x_o and
x_o^T x_o about fixed shifts, so only small matrices leave onnxruntime (the products run in its
threaded GEMM, without moving the feature maps into NumPy first)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibrate import CHANNELS_FIRST, PREFIX, centred_rows, default_opset, sampled_site, second_moment
from .stats import CrossStats


@dataclass(frozen=True)
class CrossSite:
    """One measured site of a segment: where its units lie, how it is sampled, how many units
    the pruned run (`kept`) and the original (`width`) have there."""

    tensor: str
    axis: int
    rank: int
    stride: int
    kept: int
    width: int
    positions: int | None  # rows one sample gives after the stride; None if unknown

    @property
    def per_sample(self) -> bool:
        """Products per sample on [N, C, P] maps pay off when a sample has many positions per unit."""
        return self.axis == 1 and self.positions is not None and self.positions >= CHANNELS_FIRST * self.width


def sampled(array: np.ndarray, site: CrossSite) -> np.ndarray:
    """The original's activation as the pruned graph's cross input: float32, every `stride`-th
    position of channels-first maps (as the calibration samples it)."""
    if site.stride > 1 and site.axis == 1 and array.ndim >= 3:
        array = array[(slice(None), slice(None), *[slice(None, None, site.stride)] * (array.ndim - 2))]
    return np.ascontiguousarray(array, dtype=np.float32)


@dataclass(frozen=True)
class CrossOutputs:
    """The names of one site's outputs in the patched session."""

    original: str  # the input that takes the original's sampled activation
    oo_from: str  # the input that takes the first row that x_o^T x_o sums: ALL_ROWS, or NO_ROWS where no statistics keep it
    pp: str
    po: str
    oo: str
    sum_p: str
    sum_o: str
    rshape: str

    def fetched(self) -> list[str]:
        return [self.pp, self.po, self.oo, self.sum_p, self.sum_o, self.rshape]


ALL_ROWS, NO_ROWS = np.array([0], np.int64), np.array([np.iinfo(np.int64).max], np.int64)


def cross_patch(part: onnx.ModelProto, sites: Sequence[CrossSite], shifts: dict[str, tuple[np.ndarray, np.ndarray]],
                passed: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, CrossOutputs]]:
    """A patch (see `calibrate.make_session`) of the pruned segment `part` that outputs, per site,
    the products of its rows about `shifts` (pruned, original), their raw column sums and the
    rows' shape; the `passed` tensors stay outputs of the session."""
    opset = default_opset(part)
    patch = onnx.ModelProto()
    graph = patch.graph
    names = {}
    for i, site in enumerate(sites):
        p = f"{PREFIX}x{i}_"
        shift_p, shift_o = shifts[site.tensor]
        graph.initializer.extend([numpy_helper.from_array(np.asarray(shift_p, np.float32), p + "shift_p"),
                                  numpy_helper.from_array(np.asarray(shift_o, np.float32), p + "shift_o")])
        graph.input.append(helper.make_tensor_value_info(p + "original", TensorProto.FLOAT, None))
        source = sampled_site(graph, site.tensor, site.rank, site.stride, p + "p_")
        rows_p = centred_rows(graph, source, p + "shift_p", site.axis, site.rank, site.kept, site.per_sample, p + "p_", opset)
        rows_o = centred_rows(graph, p + "original", p + "shift_o", site.axis, site.rank, site.width, site.per_sample, p + "o_", opset)
        # x_o^T x_o is kept by some statistics only: the rows from `oo_from` on (all or none) enter it
        graph.input.append(helper.make_tensor_value_info(p + "oo_from", TensorProto.INT64, [1]))
        sliced = p + "o_some"
        graph.node.append(helper.make_node("Slice", [rows_o, p + "oo_from", PREFIX + "oo_to", PREFIX + "oo_axis"], [sliced]))
        for left, right, product in ((rows_p, rows_p, "pp"), (rows_p, rows_o, "po"), (sliced, sliced, "oo")):
            graph.node.extend(second_moment(left, right, site.per_sample, p + product))
        names[site.tensor] = CrossOutputs(p + "original", p + "oo_from", p + "pp", p + "po", p + "oo", p + "p_sum", p + "o_sum", p + "p_rshape")
    graph.initializer.extend([numpy_helper.from_array(NO_ROWS, PREFIX + "oo_to"), numpy_helper.from_array(np.array([0], np.int64), PREFIX + "oo_axis")])
    fetched = [t for o in names.values() for t in o.fetched()]
    graph.output.extend(helper.make_empty_tensor_value_info(t) for t in [*passed, *fetched])
    return patch, names


def feeds(outputs: CrossOutputs, site: CrossSite, original: np.ndarray, stats: CrossStats) -> dict[str, np.ndarray]:
    """The patched session's inputs for one site: the original's activation there, and whether
    the statistics this batch goes to keep x_o^T x_o."""
    return {outputs.original: sampled(original, site), outputs.oo_from: ALL_ROWS if stats.with_oo else NO_ROWS}


def accumulate(stats: CrossStats, site: CrossSite, values: dict[str, np.ndarray], outputs: CrossOutputs) -> bool:
    """Add one batch's fetched products to `stats`; whether the pruned activation differs from
    the original's: their units differ, or their products or sums do (the same kernels on
    equal inputs give equal bits; a difference below float32 round-off counts as none)."""

    def summed(product: np.ndarray) -> np.ndarray:
        return product.astype(np.float64) if product.ndim == 2 else product.sum(axis=0, dtype=np.float64)

    rows = int(np.prod(values[outputs.rshape])) // max(site.kept, 1)
    sum_p, sum_o = values[outputs.sum_p], values[outputs.sum_o]
    pp, po = values[outputs.pp], values[outputs.po]
    oo = summed(values[outputs.oo]) if stats.with_oo else None
    stats.add_moments(rows, sum_p.reshape(-1, site.kept).sum(axis=0, dtype=np.float64),
                      sum_o.reshape(-1, site.width).sum(axis=0, dtype=np.float64), summed(pp), summed(po), oo)
    return site.kept != site.width or not (np.array_equal(pp, po) and np.array_equal(sum_p, sum_o))
