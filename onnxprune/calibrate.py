"""Calibration: run onnxruntime on an instrumented copy of the model that computes each
site's Gram matrix in the graph, so only n x n matrices leave the session.

Each batch's Gram is computed in float32 by onnxruntime's GEMM on rows centred by a fixed
estimate of the mean (from a reference batch), and added to float64 accumulators (DESIGN §4):
the float32 error is relative to the spread of the activations, not to their mean. On convolutional feature maps
whose Gram would cost more than a share of the forward pass, every s-th row and column of the
map is sampled (a 1x1 MaxPool with stride s, which onnxruntime runs in its blocked layout)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .analyse import Site
from .errors import ModelError
from .graph import GraphIndex, copy_model, default_opset, get_attr
from .ops import BROADCAST_ELEMENTWISE, CHANNEL_PARAM_OPS, UNARY_PASS_THROUGH, op_key
from .stats import SiteStats
from .weights import LARGE_MODEL, has_weights_on_disk, model_bytes, session_files

PREFIX = "__onnxprune_"
GRAM_BUDGET = 0.25  # with spatial_stride="auto", the Gram work may be this fraction of the model's MACs
MAX_STRIDE = 4
CHANNELS_FIRST = 2  # positions per sample per unit from which a site's Gram is computed per sample
ROWS_PER_UNIT = 1024  # "auto" never subsamples a site below this many calibration rows per unit (64 until session 26:
# the sequential refit fits whole maps from the kept units, and neighbouring positions repeat each other; docs/benchmark.md)


def positions(shape: Sequence[int | None], axis: int) -> int | None:
    """Rows one sample contributes to a site: the product of the dims other than batch and unit axis."""
    dims = [d for a, d in enumerate(shape) if a not in (0, axis)]
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


def rows_per_sample(shapes: dict, tensor: str, axis: int) -> int | None:
    """Rows one sample gives a site on `tensor` with units on `axis`; None if its shape is unknown."""
    shape = shapes.get(tensor)
    return positions(shape, axis) if shape else None


def sampled_positions(shape: Sequence[int | None] | None, axis: int, stride: int = 1) -> int | None:
    """Rows one sample contributes to a site with units on `axis` after its spatial stride (ceil
    per dim, like the MaxPool)."""
    if shape is None:
        return None
    if stride == 1:
        return positions(shape, axis)
    dims = shape[2:]
    return None if any(d is None for d in dims) else int(np.prod([-(-int(d) // stride) for d in dims], dtype=np.int64))


def _max_stride(site: Site, shape: Sequence[int | None] | None) -> int:
    """Largest stride that keeps at least two samples along every spatial dim (channels-first maps only)."""
    if shape is None or site.axis != 1 or len(shape) < 3 or any(d is None for d in shape[2:]):
        return 1
    return max(1, min(MAX_STRIDE, min(int(d) for d in shape[2:]) // 2))


PER_POSITION = UNARY_PASS_THROUGH | BROADCAST_ELEMENTWISE | frozenset(CHANNEL_PARAM_OPS) | {"Concat"}


def phase_periods(index: GraphIndex, sites: list[Site]) -> dict[str, int]:
    """Per site, the stride of the ConvTranspose ops, and the block size of the DepthToSpace ops
    (each phase of a PixelShuffle is another input channel), whose outputs reach it through
    per-position ops only (their least common multiple): such a map repeats a pattern with that
    period, and a spatial stride sharing a factor with it samples one phase alone, where a unit
    can be silent (a ReLU after a k4/s2 deconvolution) and look dead."""
    periods = {}
    for site in sites:
        period, seen, stack = 1, set(), [site.tensor]
        while stack and len(seen) < 64:
            node = index.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if op_key(node) == "ConvTranspose":
                period = math.lcm(period, *(get_attr(node, "strides", []) or [1]))
            elif op_key(node) == "DepthToSpace":
                period = math.lcm(period, get_attr(node, "blocksize", 1))
            elif op_key(node) in PER_POSITION:
                stack.extend(name for name in node.input if name and not index.is_constant(name))
        if period > 1:
            periods[site.tensor] = period
    return periods


def choose_strides(sites: list[Site], shapes: dict, model_macs: int, spatial_stride: int | str = "auto",
                   samples: int | None = None, budget: float = GRAM_BUDGET, periods: dict[str, int] | None = None) -> dict[str, int]:
    """Spatial stride per site. "auto": widen the stride of the currently most expensive site
    until the Gram work (rows x n^2 per sample) is within `budget` x the model's MACs, keeping at
    least ROWS_PER_UNIT rows per unit over the `samples` calibration samples (when given), and
    never a stride that shares a factor with the site's phase period (`phase_periods`)."""
    periods = periods or {}
    limits = {s.tensor: _max_stride(s, shapes.get(s.tensor)) for s in sites}
    if spatial_stride != "auto":
        return {s.tensor: min(int(spatial_stride), limits[s.tensor]) for s in sites}
    strides = {s.tensor: 1 for s in sites}

    def rows(site: Site, stride: int) -> float:
        shape = shapes.get(site.tensor) or ()
        return (positions(shape, site.axis) or 0) / stride ** max(len(shape) - 2, 0)

    def work(site: Site, stride: int) -> float:
        return rows(site, stride) * site.width ** 2

    if samples is not None:  # subsampling must leave the statistics well determined
        for site in sites:
            while limits[site.tensor] > 1 and samples * rows(site, limits[site.tensor]) < ROWS_PER_UNIT * site.width:
                limits[site.tensor] -= 1

    def wider(site: Site, stride: int) -> int:
        stride += 1
        while math.gcd(stride, periods.get(site.tensor, 1)) > 1:
            stride += 1
        return stride

    total = sum(work(s, 1) for s in sites)
    heap = [(-work(s, 1), i) for i, s in enumerate(sites) if wider(s, 1) <= limits[s.tensor]]
    heapq.heapify(heap)
    while heap and total > budget * model_macs:
        cost, i = heapq.heappop(heap)
        site = sites[i]
        stride = wider(site, strides[site.tensor])
        strides[site.tensor] = stride
        total += work(site, stride) + cost
        if wider(site, stride) <= limits[site.tensor]:
            heapq.heappush(heap, (-work(site, stride), i))
    return strides


def channels_first(axis: int, width: int, positions_per_sample: int | None) -> bool:
    """Per-sample Grams on the [N, C, positions] map (no transpose of the activations) pay off
    when a sample has many positions per unit; the [N, C, C] output stays small then."""
    return axis == 1 and positions_per_sample is not None and positions_per_sample >= CHANNELS_FIRST * width


def instrument(model: onnx.ModelProto, sites: list[Site], ranks: dict[str, int], strides: dict[str, int] | None = None,
               positions_after: dict[str, int] | None = None) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """A patch that makes the model take a shift vector m per site and output (X - m)^T (X - m),
    per-sample column sums of X and the shape of X (rows x n), in float32, X sampled with the
    site's stride. The patch holds only the added nodes, constants, inputs and outputs: the
    model's bytes followed by the patch's parse as the instrumented model (protobuf appends
    repeated fields), so the weights are never copied (see `make_session`)."""
    opset = default_opset(model) or 1
    strides, positions_after = strides or {}, positions_after or {}
    out = onnx.ModelProto()
    graph = out.graph
    names = []
    for i, site in enumerate(sites):
        p = f"{PREFIX}{i}_"
        per_sample = channels_first(site.axis, site.width, positions_after.get(site.tensor))
        source = sampled_site(graph, site.tensor, ranks[site.tensor], strides.get(site.tensor, 1), p)
        graph.input.append(helper.make_tensor_value_info(p + "shift", TensorProto.FLOAT, [site.width]))
        rows = centred_rows(graph, source, p + "shift", site.axis, ranks[site.tensor], site.width, per_sample, p, opset)
        graph.node.extend(second_moment(rows, rows, per_sample, p + "gram"))
        graph.output.extend([
            helper.make_tensor_value_info(p + "gram", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "sum", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + "rshape", TensorProto.INT64, None),
        ])
        names.append((p + "gram", p + "sum", p + "rshape"))
    return out, names


def sampled_site(graph: onnx.GraphProto, tensor: str, rank: int, stride: int, p: str) -> str:
    """Nodes that give the site's activation in float32, every `stride`-th position of each
    spatial dim (a 1x1 MaxPool, which onnxruntime runs in its blocked layout)."""
    graph.node.append(helper.make_node("Cast", [tensor], [p + "x"], to=TensorProto.FLOAT))  # a no-op on float32, removed by onnxruntime
    if stride == 1:
        return p + "x"
    spatial = rank - 2
    graph.node.append(helper.make_node("MaxPool", [p + "x"], [p + "sampled"], kernel_shape=[1] * spatial, strides=[stride] * spatial))
    return p + "sampled"


def centred_rows(graph: onnx.GraphProto, source: str, shift: str, axis: int, rank: int, width: int, per_sample: bool,
                 p: str, opset: int) -> str:
    """Nodes that lay a site's (sampled) activation out as rows centred by `shift`: [N, C, P]
    `per_sample` (no transpose of the map), else [R, C]. Also `p`sum, the per-sample column sums
    of the raw activation, and `p`rshape, the shape of the rows."""
    others = [a for a in range(1, rank) if a != axis] if axis != 0 else list(range(1, rank))
    if not others:
        graph.node.append(helper.make_node("Identity", [source], [p + "sum"]))
    elif opset >= 13:
        graph.initializer.append(numpy_helper.from_array(np.array(others, dtype=np.int64), p + "axes"))
        graph.node.append(helper.make_node("ReduceSum", [source, p + "axes"], [p + "sum"], keepdims=0))
    else:
        graph.node.append(helper.make_node("ReduceSum", [source], [p + "sum"], axes=others, keepdims=0))
    if per_sample:  # [N, C, P]: one product per sample, X_n X_n^T, without moving the feature map (summed over N outside)
        graph.initializer.append(numpy_helper.from_array(np.array([0, width, -1], dtype=np.int64), p + "shape"))
        graph.initializer.append(numpy_helper.from_array(np.array([width, 1], dtype=np.int64), p + "column"))
        graph.node.append(helper.make_node("Reshape", [source, p + "shape"], [p + "raw"]))
        graph.node.append(helper.make_node("Reshape", [shift, p + "column"], [p + "centre"]))
        graph.node.append(helper.make_node("Sub", [p + "raw", p + "centre"], [p + "rows"]))
    else:
        if axis != rank - 1:
            perm = [a for a in range(rank) if a != axis] + [axis]
            graph.node.append(helper.make_node("Transpose", [source], [p + "t"], perm=perm))
            source = p + "t"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, width], dtype=np.int64), p + "shape"))
        graph.node.append(helper.make_node("Reshape", [source, p + "shape"], [p + "raw"]))
        graph.node.append(helper.make_node("Sub", [p + "raw", shift], [p + "rows"]))
    graph.node.append(helper.make_node("Shape", [p + "rows"], [p + "rshape"]))
    return p + "rows"


def second_moment(left: str, right: str, per_sample: bool, output: str) -> list[onnx.NodeProto]:
    """left^T right of two row layouts from `centred_rows`: [N, k, n] per sample, else [k, n]
    (onnxruntime fuses the Transpose into its MatMul)."""
    transposed = output + "_T"
    if per_sample:
        return [helper.make_node("Transpose", [right], [transposed], perm=[0, 2, 1]),
                helper.make_node("MatMul", [left, transposed], [output])]
    return [helper.make_node("Transpose", [left], [transposed], perm=[1, 0]),
            helper.make_node("MatMul", [transposed, right], [output])]


def make_session(model: onnx.ModelProto, optimize: bool = True, patch: onnx.ModelProto | None = None,
                 threads: int = 0, timing: bool = False, spinning: bool = True, log_level: int = 3,
                 rewritten: bool = False) -> ort.InferenceSession:
    """A CPU session of the model; with `patch` (from `instrument`) merged in, the patch's outputs
    replace the model's (whatever only they needed is not computed). Large models reach
    onnxruntime with their weights in files (`session_files`), which it maps; unless the session
    is `timing` latency (onnxruntime's defaults), they run without the memory arena and without
    pre-packed weights for the GEMM kernels: a second copy in memory that made no measurable
    difference to the calibration time of SmolLM2-135M. `spinning` False stops onnxruntime's
    threads from busy-waiting after a run, for callers that compute in NumPy between runs (the
    spinning threads made those BLAS calls several times slower on 2 cores). `log_level` 4 keeps
    onnxruntime from printing the errors of a caller that handles them. A `rewritten` model
    (onnxprune's own) that onnxruntime refuses is onnxprune's fault: a RuntimeError, not a
    ModelError about the user's input."""
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = log_level
    options.intra_op_num_threads = threads  # 0: onnxruntime's default
    large = model_bytes(model) >= LARGE_MODEL
    if patch is not None:  # run each site's statistics as soon as the site exists, not after the whole graph
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if large and not timing:  # the arena keeps every size it ever served; a large model's working set would pile up
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False  # a run's planned block holds every intermediate at once: +133 MB on SmolLM2
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    extra = patch.SerializeToString() if patch is not None else b""
    try:
        if large or has_weights_on_disk(model):
            with session_files(model, drop_outputs=patch is not None) as (folder, small):
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
                return ort.InferenceSession(small.SerializeToString() + extra, options, providers=["CPUExecutionProvider"])
        payload = (copy_model(model, skip_graph=("output",)) if patch is not None else model).SerializeToString()
        return ort.InferenceSession(payload + extra, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        if rewritten:
            raise RuntimeError(f"onnxruntime cannot load the pruned model: {str(exc).splitlines()[0]}") from None
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def uncentred(rows: int, shift: np.ndarray, total: np.ndarray, shifted_gram: np.ndarray) -> SiteStats:
    """float64 statistics [1 X]^T [1 X] from the Gram about a fixed `shift` and the column sums:
    X^T X = (X-m)^T (X-m) + m s^T + s m^T - rows m m^T with s = sum(X) (exact algebra).
    `shifted_gram` (float64) is turned into the result in place."""
    shift = shift.astype(np.float64)
    gram = shifted_gram
    gram += np.outer(shift, total)
    gram += np.outer(total, shift)
    gram -= rows * np.outer(shift, shift)
    gram += gram.T  # NumPy buffers the overlapping transpose
    gram *= 0.5
    return SiteStats(rows, total, gram)


def collect_stats(
    model: onnx.ModelProto,
    sites: list[Site],
    ranks: dict[str, int],
    batches: Iterable[dict[str, np.ndarray]],
    on_batch: Callable[[int], None] | None = None,
    strides: dict[str, int] | None = None,
    reference: dict[str, np.ndarray] | None = None,
    shapes: dict | None = None,
) -> dict[str, SiteStats]:
    """Stream the batches through the instrumented model and accumulate float64 statistics.

    Every batch is centred by the mean of `reference` (default: the first batch); shards of one
    calibration set pass the same reference, so their statistics merge to the single pass's.
    `shapes` (per-sample static shapes) let wide feature maps use per-sample Grams."""
    if not sites:
        return {}
    strides = strides or {}
    after = {s.tensor: sampled_positions((shapes or {}).get(s.tensor), s.axis, strides.get(s.tensor, 1)) for s in sites}
    patch, names = instrument(model, sites, ranks, strides, {t: p for t, p in after.items() if p is not None})
    session = make_session(model, patch=patch)
    fetch = [name for triple in names for name in triple]
    zero = {site.tensor: np.zeros(site.width, np.float32) for site in sites}

    # the whole-batch Grams are written into buffers that every batch reuses: fresh outputs each
    # batch cost page faults and leave the heap fragmented (hundreds of MB for a language model)
    reused = {names[i][0]: np.empty((site.width, site.width), np.float32) for i, site in enumerate(sites) if after[site.tensor] is None}
    binding = session.io_binding()

    def run(batch: dict[str, np.ndarray], shifts: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per site: rows, column sums (float64) and the float32 Gram about the shift."""
        feeds = dict(batch)
        feeds.update({f"{PREFIX}{i}_shift": shifts[site.tensor] for i, site in enumerate(sites)})
        try:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in fetch:
                if name in reused:
                    binding.bind_output(name, "cpu", 0, np.float32, list(reused[name].shape), reused[name].ctypes.data)
                else:
                    binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"onnxruntime failed on a calibration batch: {str(exc).splitlines()[0]}") from None
        values = [reused[name] if name in reused else value.numpy() for name, value in zip(fetch, binding.get_outputs(), strict=True)]
        return [(int(np.prod(values[3 * i + 2])) // site.width, values[3 * i + 1].reshape(-1, site.width).sum(axis=0, dtype=np.float64),
                 values[3 * i] if values[3 * i].ndim == 2 else values[3 * i].sum(axis=0, dtype=np.float64))
                for i, site in enumerate(sites)]

    shifts: dict[str, np.ndarray] | None = None
    rows = dict.fromkeys(zero, 0)
    totals = {site.tensor: np.zeros(site.width) for site in sites}
    grams = {site.tensor: np.zeros((site.width, site.width)) for site in sites}
    for batch in batches:
        if shifts is None:  # one fixed centre per site, the mean of the reference batch (DESIGN §4)
            shifts = {site.tensor: (total / max(count, 1)).astype(np.float32)
                      for site, (count, total, _) in zip(sites, run(reference if reference is not None else batch, zero), strict=True)}
        for site, (count, total, gram) in zip(sites, run(batch, shifts), strict=True):
            rows[site.tensor] += count
            totals[site.tensor] += total
            grams[site.tensor] += gram
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
    shifts = shifts or zero
    # each accumulator becomes its result in place (a second set of Grams would double the memory)
    return {site.tensor: uncentred(rows[site.tensor], shifts[site.tensor], totals[site.tensor], grams.pop(site.tensor)) for site in sites}
