"""Preparation: load and check the model and its calibration data, hold out verification
samples, analyse the graph, and compute the calibration statistics (shards reuse it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .analyse import Analysis
from .calibrate import choose_strides, collect_stats, phase_periods, rows_per_sample
from .cost import count_macs
from .data import CalibrationData, load_calibration
from .errors import CalibrationError, ModelError, TargetError
from .graph import GraphIndex, fixed_batch_size, subgraphs
from .load import load_model, map_large_allocations
from .ops import MAC_OPS, STANDARD_DOMAINS, op_key
from .plan import agree, counted
from .rules import CARRY, CONSUME, PRODUCE
from .sources import ImageOptions
from .stats import SiteStats
from .tidy import shapes_and_index
from .undersampled import first_named
from .unfuse import analyse_unfused
from .weights import LARGE_MODEL, WeightsFile, model_bytes

REFERENCE_SAMPLES = 8  # calibration samples whose mean centres the float32 Gram of every batch
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def default_verify_samples(n_samples: int) -> int:
    """10% of the calibration samples, at most 256, held out for verification."""
    return min(256, n_samples // 10)


@dataclass
class Prepared:
    """Everything before calibration: the model, its checked data split, shapes and analysis."""

    original: onnx.ModelProto
    name: str
    data: CalibrationData
    calib_data: CalibrationData
    verify_data: CalibrationData
    shapes: dict
    index: GraphIndex
    analysis: Analysis
    batch_size: int
    warnings: list[str]
    strides: dict[str, int]
    static_batch: bool = False
    weights: WeightsFile | None = None  # the temporary file of a large model's weights (kept while `original` is used)
    report_data: CalibrationData | None = None  # samples no decision reads, for the report's fidelity (--report-samples)

    @property
    def fidelity_data(self) -> CalibrationData:
        """The samples the report's fidelity is measured on: --report-samples, else the held-out ones."""
        return self.verify_data if self.report_data is None else self.report_data

    @property
    def subsampled(self) -> dict[str, int]:
        """The sites whose feature maps the statistics sample with a stride > 1."""
        return {tensor: stride for tensor, stride in self.strides.items() if stride > 1}


def prepare_options(exclude, batch_size, verify_samples, image_options, calib_samples, spatial_stride="auto", report_samples=0) -> dict:
    """The options of `prepare`, as keywords (shards rebuild the same preparation)."""
    return dict(exclude=tuple(exclude), batch_size=batch_size, verify_samples=verify_samples, image_options=image_options,
                calib_samples=calib_samples, spatial_stride=spatial_stride, report_samples=report_samples)


QUANTISED_OPS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear"})


def unanalysed_ops(model: onnx.ModelProto) -> str | None:
    """What makes whole models unprunable that no rule reads, with the way out: ops of other
    domains than ONNX's that onnxprune has no rule for (onnxruntime's fused and blocked-layout
    ops), or quantised layers; None if there are none."""
    known = CARRY.keys() | CONSUME.keys() | PRODUCE.keys()
    found = sorted({op_key(n) for n in model.graph.node if n.domain not in STANDARD_DOMAINS and op_key(n) not in known})
    if found:
        return (f"ops of other domains are not analysed ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}): "
                "prune the model as exported, before onnxruntime's offline optimisations")
    quantised = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTISED_OPS})
    if quantised:
        return f"quantised layers are not analysed ({', '.join(quantised)}): prune the float model, then quantise it"
    holders = [(n, count) for n in model.graph.node if (count := _layers_in_subgraphs(n))]
    if holders:
        node, count = holders[0]
        return (f"the {count} layers inside {node.op_type} '{node.name or node.output[0]}'{' and other control-flow ops' if len(holders) > 1 else ''} "
                "are not analysed (only the main graph is): prune a model without it (for a merged decoder with an If on "
                "use_cache_branch, its decoder_with_past model or an export without merging)")
    return None


def _layers_in_subgraphs(node: onnx.NodeProto) -> int:
    """Conv/Gemm/MatMul nodes inside a node's subgraphs (an If's branches, a Loop's body), nested ones too."""
    return sum((inner.op_type in MAC_OPS) + _layers_in_subgraphs(inner) for graph in subgraphs(node) for inner in graph.node)


def training_mode_ops(model: onnx.ModelProto) -> str | None:
    """The nodes that make the model run in training mode, with the way out, or None:
    BatchNormalization with `training_mode` 1 or running-statistics outputs (opsets < 14 had
    them in training exports), Dropout with a training-mode input that is not constant false.
    onnxruntime then normalises each batch by its own statistics: outputs depend on the batch,
    and no pruned model can reproduce them."""
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute
                      and n.attribute[0].name == "value"})
    found = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i for a in node.attribute) or any(o for o in node.output[1:])
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            flag = constants.get(node.input[2])
            training = flag is None or bool(onnx.numpy_helper.to_array(flag).any())
        else:
            continue
        if training:
            found.append(f"{node.op_type} '{node.name or node.output[0]}'")
    if not found:
        return None
    return (f"the model runs in training mode ({', '.join(found[:2])}{', ...' if len(found) > 2 else ''}: batch statistics or "
            "random dropout), so its outputs depend on the batch; export it in eval mode (model.eval(), "
            "torch.onnx.TrainingMode.EVAL) and prune that")


def _time_first_hint(model: onnx.ModelProto) -> str:
    """When an input fixes axis 0 but leaves a later axis free, axis 0 may be time, not batch."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        free = [i for i, d in enumerate(dims) if i > 0 and not d.HasField("dim_value")]
        if value.name not in initializers and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 1 and free:
            return (f" (or, if axis 0 of input '{value.name}' is its time axis and axis {free[0]} its batch, export the model"
                    " batch-first: onnxprune reads samples along axis 0)")
    return ""


def prepare(
    model: str | Path | onnx.ModelProto,
    calib,
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = 32,
    verify_samples: int | None = None,
    image_options: ImageOptions | None = None,
    calib_samples: int | None = None,
    spatial_stride: int | str = "auto",
    report_samples: int = 0,
) -> Prepared:
    """Load and check the model and data, hold out verification samples (and `report_samples`
    more, last, that only the report's fidelity reads), analyse the graph."""
    original, name, weights, load_notes = load_model(model, offload_weights=True)
    if problem := training_mode_ops(original):
        raise ModelError(f"'{name}': {problem}")
    if model_bytes(original) >= LARGE_MODEL:
        map_large_allocations()
    data = load_calibration(calib, original, image_options, calib_samples)
    if not 0 <= report_samples < data.n_samples:
        raise CalibrationError(f"--report-samples {report_samples} must leave calibration samples (the data has {data.n_samples})")
    used, report_data = data.split(report_samples)
    n_verify = default_verify_samples(used.n_samples) if verify_samples is None else verify_samples
    if not 0 <= n_verify < used.n_samples:
        raise CalibrationError(f"--verify-samples {n_verify} must leave calibration samples (the data has {data.n_samples}"
                               + (f", {report_samples} of them for the report)" if report_samples else ")"))
    calib_data, verify_data = used.split(n_verify)
    notes = [*load_notes, *data.notes]
    batch_size, static = _batch_size_for(original, batch_size)
    if static:  # onnxruntime only runs whole batches of the model's fixed batch size
        if calib_data.n_samples < batch_size:
            raise CalibrationError(f"model '{name}' has a fixed batch size of {batch_size}; give at least {batch_size + n_verify} samples"
                                   + _time_first_hint(original))
        dropped = calib_data.n_samples % batch_size + verify_data.n_samples % batch_size + report_data.n_samples % batch_size
        calib_data, verify_data, report_data = (part.take(0, part.n_samples - part.n_samples % batch_size)
                                                for part in (calib_data, verify_data, report_data))
        if dropped:
            notes.append(f"model '{name}' has a fixed batch size of {batch_size}: {dropped} samples that do not fill a batch were left out")
    shapes, index = shapes_and_index(original, data.sample_shapes(batch_size if static else 1))
    index, analysis = analyse_unfused(original, list(exclude), index)
    if not analysis.prunable:
        reasons = "; ".join(f"{s.name}: {s.pinned[0]}" for s in analysis.spaces[:3]) or "no Conv/Gemm/MatMul with constant weights"
        raise ModelError(f"nothing to prune in '{name}': {len(analysis.spaces)} spaces found, none prunable ({reasons})"
                         + (f"; {hint}" if (hint := unanalysed_ops(original)) else ""))
    notes += use_pooled_inputs(analysis, shapes, calib_data.n_samples)
    if spatial_stride != "auto" and (not isinstance(spatial_stride, int) or spatial_stride < 1):
        raise TargetError(f"--spatial-stride must be 'auto' or a positive integer, got {spatial_stride!r}")
    sites = analysis.sites()
    strides = choose_strides(sites, shapes, count_macs(index), spatial_stride, calib_data.n_samples, periods=phase_periods(index, sites))
    return Prepared(original, name, data, calib_data, verify_data, shapes, index, analysis, batch_size, notes, strides, static, weights,
                    report_data if report_samples else None)


def use_pooled_inputs(analysis: Analysis, shapes: dict, samples: int) -> list[str]:
    """A pooled site that would see no more rows than it has units (an SE block's squeeze with
    fewer calibration samples than channels) takes its statistics from every position of the
    pooled input instead of pinning its space (analyse._attach_pooled_sources); one note says
    so, naming the first few (a pooled site read by several spaces, a Concat's branches, once)."""
    read: dict[str, str] = {}  # pooled site -> its rows and the input read instead
    for space in analysis.prunable:
        for tensor, source in list(space.pooled.items()):
            placement = space.tensors[tensor]
            per_sample = rows_per_sample(shapes, tensor, placement.axis)
            if per_sample is not None and samples * per_sample <= placement.size:
                space.read_pooled_input(tensor)
                read.setdefault(tensor, f"{samples * per_sample} rows for {placement.size} units, reads '{source}'")
        space.pooled.clear()
    if not read:
        return []
    return [f"{counted(len(read), 'pooled site')} would see no more calibration rows than units, so {agree(len(read), 'its', 'their')} "
            f"consumers' recovery is fitted on every position of the pooled input instead ({first_named(read)}); more calibration "
            "samples help"]


def calibration_statistics(prepared: Prepared, shard: tuple[int, int] | None = None, progress: ProgressFactory | None = None) -> dict[str, SiteStats]:
    """Statistics of every site over the calibration samples (or one contiguous shard of them)."""
    data = prepared.calib_data
    if shard is not None:
        index, count = shard
        step = prepared.batch_size if prepared.calib_data.n_samples % prepared.batch_size == 0 else 1
        bounds = (np.linspace(0, data.n_samples // step, count + 1).astype(int)) * step  # whole batches per shard
        data = data.take(bounds[index], bounds[index + 1])
    sites = prepared.analysis.sites()
    ranks = {site.tensor: len(prepared.shapes[site.tensor]) for site in sites}
    advance = progress("calibrating", data.n_samples) if progress is not None else (lambda _: None)
    # every shard centres its rows by the mean of the same few samples (merges stay exact)
    reference_size = prepared.batch_size if prepared.static_batch else min(REFERENCE_SAMPLES, prepared.batch_size)
    reference = next(iter(prepared.calib_data.batches(reference_size)))
    return collect_stats(prepared.original, sites, ranks, data.batches(prepared.batch_size), advance, prepared.strides, reference, prepared.shapes)


def _batch_size_for(model: onnx.ModelProto, wanted: int) -> tuple[int, bool]:
    """(batch size, fixed): a static batch dimension in the model's inputs overrides --batch-size."""
    fixed = fixed_batch_size(model)
    return (fixed, True) if fixed else (wanted, False)
