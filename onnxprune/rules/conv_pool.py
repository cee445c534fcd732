"""Convolutions and per-channel spatial ops: Conv creates and reads units on axis 1, depthwise
Conv and pooling act on each channel alone, Resize keeps the channel axis."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphIndex, Shape, get_attr, get_text_attr
from ..ops import CHANNEL_WISE
from ..placement import Placement
from ..spaces import AttrUpdate, Consumer, ParamSlice, ShapeUpdate
from .registry import Coarsen, Effect, Pin, Produced, carries, consumes, produces, read_by, slice_param, through
from .shape_values import entry_origin


def _conv_output(index: GraphIndex, node: onnx.NodeProto) -> Produced | None:
    if len(node.input) > 1 and index.is_constant(node.input[1]):
        dims = index.const_dims(node.input[1])
        if get_attr(node, "group", 1) == 1 and len(dims) >= 3:
            return Produced(node.output[0], 1, int(dims[0] if node.op_type == "Conv" else dims[1]))
    return None


def _conv_slices(index: GraphIndex, node: onnx.NodeProto, n: int) -> list[ParamSlice]:
    label, out = index.label(node), node.output[0]
    slices = [ParamSlice(label, 1, 0 if node.op_type == "Conv" else 1, out)]
    return slices + ([ParamSlice(label, 2, 0, out)] if len(node.input) > 2 and node.input[2] else [])


produces(("Conv", "ConvTranspose"), _conv_output, _conv_slices)


@consumes("Conv", "ConvTranspose")
def conv_reads(index: GraphIndex, node: onnx.NodeProto, slot: int, tensor: str, placement: Placement) -> list[Effect] | None:
    """An ungrouped Conv with a constant weight reads the units as its input channels."""
    if slot != 0 or len(node.input) < 2 or not index.is_constant(node.input[1]):
        return None
    if get_attr(node, "group", 1) != 1:
        return None  # depthwise is a pass-through; other groups pin in its carry rule
    op, label = node.op_type, index.label(node)
    dims = index.const_dims(node.input[1])
    in_axis, out_axis = (1, 0) if op == "Conv" else (0, 1)
    if placement.axis != 1:
        return [Pin(f"{op} '{label}' reads the units on axis {placement.axis}, not the channel axis")]
    if dims[in_axis] != placement.size:
        return [Pin(f"{op} '{label}' weight has {dims[in_axis]} input channels, expected {placement.size}")]
    coverage = conv_tap_coverage(node, index.shape(node.input[0]), dims[2:]) if op == "Conv" else None
    partial = coverage is not None and bool((coverage < 1).any())  # every tap reads the input everywhere: nothing to weigh
    return read_by(index, Consumer(label, op, 1, in_axis, out_axis, tensor, coverage=tuple(map(float, coverage.ravel())) if partial else None))


def conv_tap_coverage(node: onnx.NodeProto, input_shape: Shape | None, weight_kernel: tuple[int, ...] = ()) -> np.ndarray | None:
    """For each kernel tap of a Conv, the fraction of its output positions where the tap reads
    the input, not padding (an array of the kernel's shape); None where the sizes are unknown.
    `kernel_shape` is optional in ONNX: the weight's spatial dims stand in for it."""
    kernel = list(get_attr(node, "kernel_shape", []) or weight_kernel)
    if input_shape is None or len(input_shape) < 3 or any(d is None for d in input_shape[2:]) or len(kernel) != len(input_shape) - 2:
        return None
    rank = len(kernel)
    strides, dilations = get_attr(node, "strides", [1] * rank), get_attr(node, "dilations", [1] * rank)
    pads = list(get_attr(node, "pads", [0] * 2 * rank))
    auto_pad = get_text_attr(node, "auto_pad", "NOTSET")
    coverage = np.ones(())
    for axis, (size, k, s, d) in enumerate(zip(input_shape[2:], kernel, strides, dilations, strict=True)):
        begin, end = pads[axis], pads[axis + rank]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            end = total - begin
        elif auto_pad == "VALID":
            begin = end = 0
        outputs = (size + begin + end - d * (k - 1) - 1) // s + 1
        if outputs < 1:
            return None
        read = np.arange(outputs)[:, None] * s - begin + np.arange(k)[None, :] * d  # input index of each (output, tap)
        coverage = np.multiply.outer(coverage, ((read >= 0) & (read < size)).mean(axis=0))
    return coverage


def is_depthwise(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Conv (or ConvTranspose) with one input and one output channel per group (group == channels)."""
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return False
    dims, group = index.const_dims(node.input[1]), get_attr(node, "group", 1)
    return group > 1 and dims[0] == group and dims[1] == 1


@carries("Conv", "ConvTranspose")
def grouped_conv(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A depthwise Conv or ConvTranspose (a learned per-channel upsampling; its weight is
    [C, 1, k, k] too) acts on each channel alone (slice its weight, update `group`); another
    grouped one carries whole groups (see `_whole_groups`)."""
    if not is_depthwise(index, node):
        return _whole_groups(index, node, tensor, placement)
    return _depthwise(index, node, placement)


def _depthwise(index: GraphIndex, node: onnx.NodeProto, placement: Placement) -> list[Effect]:
    """Slice the per-channel weight and bias, update `group`, pass the units through."""
    label = index.label(node)
    if placement.axis != 1:
        return [Pin(f"depthwise {node.op_type} '{label}' acts on axis 1, the units are on axis {placement.axis}")]
    effects = slice_param(index, node, 1, 0, node.input[0], placement)
    if len(node.input) > 2 and node.input[2]:
        effects += slice_param(index, node, 2, 0, node.input[0], placement)
    effects.append(AttrUpdate(label, "group", node.input[0]))
    return effects + through(label, node.input[0], node.output[0], placement)


def not_whole_groups(placement: Placement, per_group: int, where: str) -> list[Effect]:
    """[] when each unit is one whole group of `per_group` channels; else a Coarsen to whole
    groups (units aligned on group boundaries) or a Pin."""
    if placement.block < per_group:
        factor = per_group // placement.block
        aligned = per_group % placement.block == 0 and all(
            s.offset % factor == 0 and s.lo % factor == 0 and (s.hi - s.lo) % factor == 0 for s in placement.segments)
        return [Coarsen(factor, where) if aligned else Pin(f"{where} splits these units across its groups")]
    if placement.block > per_group:
        return [Pin(f"{where}: a unit spans several of its groups")]
    return []


def group_channels(node: onnx.NodeProto, dims: tuple[int, ...], group: int) -> tuple[int, int] | None:
    """(input, output) channels per group from the weight: Conv's is [C_out, C_in/G, ..],
    ConvTranspose's [C_in, C_out/G, ..]; None when its first axis does not split into groups."""
    if dims[0] % group:
        return None
    if node.op_type == "Conv":
        return int(dims[1]), int(dims[0]) // group
    return int(dims[0]) // group, int(dims[1])


def _whole_groups(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """A grouped (non-depthwise) Conv or ConvTranspose mixes the channels inside each group, so
    a unit is a whole group: its input channels (block Cin/G) and output channels (block Cout/G)
    go together, the weight loses the group's rows and `group` counts the kept groups. Finer
    units are regrown."""
    op, label, group = node.op_type, index.label(node), get_attr(node, "group", 1)
    where = f"grouped {op} '{label}' (group={group})"
    if len(node.input) < 2 or not index.is_constant(node.input[1]):
        return [Pin(f"{op} '{label}' reads a weight that is not a constant ('{node.input[1] if len(node.input) > 1 else ''}')")]
    if group == 1:
        return [Pin(f"{where} couples units in blocks")]
    dims = index.const_dims(node.input[1])
    channels = group_channels(node, dims, group)
    if placement.axis != 1 or channels is None:
        return [Pin(f"{where} reads the units on axis {placement.axis}, not the channel axis")]
    per_in, per_out = channels
    from_input = tensor == node.input[0]
    regroup = not_whole_groups(placement, per_in if from_input else per_out, where)
    if regroup:
        return regroup
    in_placement = placement if from_input else placement.moved(1, block=per_in, width=placement.width)
    out_placement = placement.moved(1, block=per_out, width=placement.width) if from_input else placement
    rows = node.output[0] if op == "Conv" else node.input[0]  # the channels the weight's first axis holds
    effects: list[Effect] = [ParamSlice(label, 1, 0, rows)]
    if len(node.input) > 2 and node.input[2]:
        bias = index.const(node.input[2])
        if bias is None or bias.shape != (group * per_out,):
            return [Pin(f"{where} has a bias that is not a constant per output channel")]
        effects.append(ParamSlice(label, 2, 0, node.output[0]))
    effects.append(AttrUpdate(label, "group", node.input[0]))
    return effects + through(label, node.input[0], node.output[0], in_placement, out_placement)


def per_channel(index: GraphIndex, node: onnx.NodeProto, placement: Placement, param_slots: tuple[int, ...] = ()) -> list[Effect]:
    """An op acting on each channel of an NCHW tensor separately; `param_slots` are indexed by
    channel (a unit may hold several channels: a group of a grouped Conv)."""
    op, label = node.op_type, index.label(node)
    if placement.axis != 1:
        return [Pin(f"{op} '{label}' acts on axis 1, the units are on axis {placement.axis}")]
    effects: list[Effect] = []
    for slot in param_slots:
        if slot < len(node.input) and node.input[slot]:
            effects += slice_param(index, node, slot, 0, node.input[0], placement, per_element=True)
    return effects + through(label, node.input[0], node.output[0], placement)


@carries(*sorted(CHANNEL_WISE))
def pool(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Pooling acts on each channel alone; a windowed pool also leaves alone a spatial axis it
    neither pools nor strides nor pads (EasyOCR's AdaptiveAvgPool2d((None, 1)) after a permute
    to [N, W, C, H]: a [1, H] kernel over units on axis 2)."""
    if placement.axis >= 2 and _untouched_spatial_axis(node, placement.axis - 2):
        return through(index.label(node), node.input[0], node.output[0], placement)
    return per_channel(index, node, placement)


def _untouched_spatial_axis(node: onnx.NodeProto, k: int) -> bool:
    """Kernel 1, stride 1, dilation 1 and no padding on spatial axis k of a windowed pool."""
    kernel = get_attr(node, "kernel_shape")
    if node.op_type not in ("MaxPool", "AveragePool", "LpPool") or kernel is None or k >= len(kernel):
        return False
    pads = get_attr(node, "pads") or [0] * (2 * len(kernel))
    auto_pad = get_text_attr(node, "auto_pad", "NOTSET")
    same = [(get_attr(node, a) or [1] * len(kernel))[k] for a in ("strides", "dilations")]
    return kernel[k] == 1 and same == [1, 1] and pads[k] == 0 and pads[k + len(kernel)] == 0 and auto_pad in ("NOTSET", "VALID")


def _resize_inputs(index: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scales, sizes) of a Resize or Upsample, constant or None: Upsample-7 holds its scales in an
    attribute, Upsample-9 and Resize-10 at input 1, Resize-11 and later at inputs 2 and 3."""
    def constant(slot: int) -> np.ndarray | None:
        return index.const(node.input[slot]) if len(node.input) > slot and node.input[slot] else None
    if node.op_type == "Upsample" and get_attr(node, "scales") is not None:
        return np.asarray(get_attr(node, "scales"), dtype=np.float32), None
    if node.op_type == "Upsample" or len(node.input) == 2:
        return constant(1), None
    return constant(2), constant(3)


@carries("Resize", "Upsample")
def resize(index: GraphIndex, node: onnx.NodeProto, tensor: str, placement: Placement) -> list[Effect]:
    """Resize (and the Upsample before it) keeps the units' axis when its scale there is 1 or
    its size there is the width; Resize-18's `axes` lists the axes its scales and sizes cover."""
    label = index.label(node)
    scales, sizes = _resize_inputs(index, node)
    axes = get_attr(node, "axes")
    rank = index.rank(tensor)
    if axes is not None:
        listed = [a % rank if rank is not None else a for a in axes]
        if placement.axis not in listed:
            return through(label, node.input[0], node.output[0], placement)
        position = listed.index(placement.axis)
    else:
        position = placement.axis
    if scales is not None and scales.size > position and scales[position] == 1:
        return through(label, node.input[0], node.output[0], placement)
    if sizes is not None and sizes.size > position and sizes[position] == placement.width:
        return [ShapeUpdate(label, 3, position, 1, node.input[0]), *through(label, node.input[0], node.output[0], placement)]
    computed = node.input[3] if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] and sizes is None else None
    if computed is not None and axes is None and entry_origin(index, computed, position) == (node.input[0], position):
        return through(label, node.input[0], node.output[0], placement)  # sizes read from the input's own shape there
    return [Pin(f"{node.op_type} '{label}' does not keep the units' axis (needs constant scales or sizes)")]
