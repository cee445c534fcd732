"""Calibration: run onnxruntime on an instrumented copy of the model that computes each
site's Gram matrix in the graph (float64), so only n x n matrices leave the session."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .analyse import Site
from .errors import ModelError
from .load import model_on_disk, needs_external_data
from .stats import SiteStats

PREFIX = "__onnxprune_"


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


def instrument(model: onnx.ModelProto, sites: list[Site], ranks: dict[str, int]) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """A copy whose outputs are, per site, X^T X, the column sums and the shape of X (rows x n)."""
    opset = default_opset(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.output[:]
    del graph.value_info[:]
    names = []
    for i, site in enumerate(sites):
        p = f"{PREFIX}{i}_"
        rank = ranks[site.tensor]
        source = site.tensor
        nodes = []
        if site.axis != rank - 1:
            perm = [a for a in range(rank) if a != site.axis] + [site.axis]
            nodes.append(helper.make_node("Transpose", [source], [p + "t"], perm=perm))
            source = p + "t"
        graph.initializer.append(numpy_helper.from_array(np.array([-1, site.width], dtype=np.int64), p + "shape"))
        nodes.append(helper.make_node("Reshape", [source, p + "shape"], [p + "rows32"]))
        nodes.append(helper.make_node("Cast", [p + "rows32"], [p + "rows"], to=TensorProto.DOUBLE))
        nodes.append(helper.make_node("Transpose", [p + "rows"], [p + "rowsT"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [p + "rowsT", p + "rows"], [p + "gram"]))
        if opset >= 13:
            graph.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), p + "axes"))
            nodes.append(helper.make_node("ReduceSum", [p + "rows", p + "axes"], [p + "sum"], keepdims=0))
        else:
            nodes.append(helper.make_node("ReduceSum", [p + "rows"], [p + "sum"], axes=[0], keepdims=0))
        nodes.append(helper.make_node("Shape", [p + "rows"], [p + "rshape"]))
        graph.node.extend(nodes)
        graph.output.extend([
            helper.make_tensor_value_info(p + "gram", TensorProto.DOUBLE, [site.width, site.width]),
            helper.make_tensor_value_info(p + "sum", TensorProto.DOUBLE, [site.width]),
            helper.make_tensor_value_info(p + "rshape", TensorProto.INT64, [2]),
        ])
        names.append((p + "gram", p + "sum", p + "rshape"))
    return out, names


def make_session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        if not needs_external_data(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with model_on_disk(model) as path:  # over the protobuf limit: onnxruntime reads it from disk
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def collect_stats(
    model: onnx.ModelProto,
    sites: list[Site],
    ranks: dict[str, int],
    batches: Iterable[dict[str, np.ndarray]],
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, SiteStats]:
    """Stream the batches through the instrumented model and accumulate float64 statistics."""
    if not sites:
        return {}
    instrumented, names = instrument(model, sites, ranks)
    session = make_session(instrumented)
    stats = {site.tensor: SiteStats.empty(site.width) for site in sites}
    fetch = [name for triple in names for name in triple]
    for batch in batches:
        try:
            values = session.run(fetch, batch)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"onnxruntime failed on a calibration batch: {str(exc).splitlines()[0]}") from None
        for i, site in enumerate(sites):
            gram, total, shape = values[3 * i: 3 * i + 3]
            stats[site.tensor].add(SiteStats(int(shape[0]), total, gram))
        if on_batch is not None:
            on_batch(len(next(iter(batch.values()))))
    return stats
