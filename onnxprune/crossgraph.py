"""One onnxruntime session per segment of the sequential pass: the original's and the pruned
model's segments run side by side, and the cross moments of each measured site (x~^T x~,
x~^T x_o, x_o^T x_o about fixed shifts) are computed in the graph, so only small matrices and
the activations at the cut leave onnxruntime (the products run in its threaded GEMM, the
feature maps never move into NumPy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibrate import PREFIX, centred_rows, channels_first, make_session, sampled_site, second_moment
from .graph import default_opset
from .segments import side_by_side
from .stats import CrossStats

PRUNED = PREFIX + "pruned/"  # the pruned segment's names in the joint session
ALL_ROWS, NO_ROWS = np.array([0], np.int64), np.array([np.iinfo(np.int64).max], np.int64)


@dataclass(frozen=True)
class CrossSite:
    """One measured site: its tensor in the original (`tensor`) and the pruned model (`pruned`),
    where its units lie, how it is sampled, and how many units the pruned run (`kept`) and the
    original (`width`) have there."""

    tensor: str
    pruned: str
    axis: int
    rank: int
    stride: int
    kept: int
    width: int
    positions: int | None  # rows one sample gives after the stride; None if unknown

    @property
    def per_sample(self) -> bool:
        """Products per sample on the [N, C, P] map, as the calibration takes its Grams there."""
        return channels_first(self.axis, self.width, self.positions)


@dataclass(frozen=True)
class CrossOutputs:
    """The names of one site's inputs and outputs in the patched session."""

    oo_from: str  # the input that takes the first row x_o^T x_o sums: ALL_ROWS, or NO_ROWS where no statistics keep it
    pp: str
    po: str
    oo: str
    sum_p: str
    sum_o: str
    rshape: str

    def fetched(self) -> list[str]:
        return [self.pp, self.po, self.oo, self.sum_p, self.sum_o, self.rshape]


def cross_patch(model: onnx.ModelProto, sites: Sequence[CrossSite], shifts: dict[str, tuple[np.ndarray, np.ndarray]],
                passed: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, CrossOutputs]]:
    """A patch (see `calibrate.make_session`) of a model computing both sites' tensors that
    outputs, per site, the products of their rows about `shifts` (pruned, original), their raw
    column sums and the rows' shape; the `passed` tensors stay outputs of the session."""
    opset = default_opset(model) or 1
    patch = onnx.ModelProto()
    graph = patch.graph
    graph.initializer.extend([numpy_helper.from_array(NO_ROWS, PREFIX + "oo_to"), numpy_helper.from_array(np.array([0], np.int64), PREFIX + "oo_axis")])
    names = {}
    for i, site in enumerate(sites):
        p = f"{PREFIX}x{i}_"
        shift_p, shift_o = shifts[site.tensor]
        graph.initializer.extend([numpy_helper.from_array(np.asarray(shift_p, np.float32), p + "shift_p"),
                                  numpy_helper.from_array(np.asarray(shift_o, np.float32), p + "shift_o")])
        source_p = sampled_site(graph, site.pruned, site.rank, site.stride, p + "p_")
        source_o = sampled_site(graph, site.tensor, site.rank, site.stride, p + "o_")
        rows_p = centred_rows(graph, source_p, p + "shift_p", site.axis, site.rank, site.kept, site.per_sample, p + "p_", opset)
        rows_o = centred_rows(graph, source_o, p + "shift_o", site.axis, site.rank, site.width, site.per_sample, p + "o_", opset)
        # x_o^T x_o is kept by some statistics only: the rows from `oo_from` on (all or none) enter it
        graph.input.append(helper.make_tensor_value_info(p + "oo_from", TensorProto.INT64, [1]))
        graph.node.append(helper.make_node("Slice", [rows_o, p + "oo_from", PREFIX + "oo_to", PREFIX + "oo_axis"], [p + "o_some"]))
        for left, right, product in ((rows_p, rows_p, "pp"), (rows_p, rows_o, "po"), (p + "o_some", p + "o_some", "oo")):
            graph.node.extend(second_moment(left, right, site.per_sample, p + product))
        names[site.tensor] = CrossOutputs(p + "oo_from", p + "pp", p + "po", p + "oo", p + "p_sum", p + "o_sum", p + "p_rshape")
    fetched = [t for o in names.values() for t in o.fetched()]
    graph.output.extend(helper.make_empty_tensor_value_info(t) for t in [*passed, *fetched])
    return patch, names


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


class JointSegment:
    """A segment of the original and of the pruned model in one session (the pruned one's names
    prefixed with PRUNED), with the cross moments of `sites` in the graph. `passed_o` and
    `passed_p` are the activations each side also returns (at the cut, for the next segment)."""

    def __init__(self, original_part: onnx.ModelProto, pruned_part: onnx.ModelProto, sites: Sequence[CrossSite],
                 shifts: dict[str, tuple[np.ndarray, np.ndarray]], passed_o: Sequence[str], passed_p: Sequence[str]):
        self.inputs_o = [i.name for i in original_part.graph.input]
        self.inputs_p = [i.name for i in pruned_part.graph.input]
        self.sites = list(sites)
        self.passed_o, self.passed_p = list(passed_o), list(passed_p)
        model = side_by_side(original_part, pruned_part, PRUNED)
        passed = [*passed_o, *(PRUNED + t for t in passed_p)]
        patch, self.outputs = cross_patch(model, self.sites, shifts, passed)
        # errors are handled by the caller (the one-shot model is written): onnxruntime need not print them
        self.session = make_session(model, patch=patch, spinning=False, log_level=4)
        self.fetch = [*passed, *(n for o in self.outputs.values() for n in o.fetched())]

    def run(self, feeds_o: dict[str, np.ndarray], feeds_p: dict[str, np.ndarray],
            stats: dict[str, CrossStats]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, bool]]:
        """One batch through both segments; each site's products go to its `stats`. Returns the
        passed activations of each side and, per site, whether the pruned activation differs
        from the original's."""
        feeds = {**feeds_o, **{PRUNED + name: value for name, value in feeds_p.items()}}
        for site in self.sites:
            feeds[self.outputs[site.tensor].oo_from] = ALL_ROWS if stats[site.tensor].with_oo else NO_ROWS
        values = dict(zip(self.fetch, self.session.run(self.fetch, feeds), strict=True))
        changed = {site.tensor: accumulate(stats[site.tensor], site, values, self.outputs[site.tensor]) for site in self.sites}
        passed_o = {name: values[name] for name in self.passed_o}
        passed_p = {name: values[PRUNED + name] for name in self.passed_p}
        return passed_o, passed_p, changed
