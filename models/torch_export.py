"""Shared by the model-building scripts: seeding and the two torch ONNX exporters (TorchScript
with BatchNorm kept as its own node, and torch.export), both with a dynamic batch axis."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

TS_OPSET = 17
DYNAMO_OPSET = 18


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def value_shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, output_name: str, opset: int = TS_OPSET,
                       output_batch_axis: int = 0, constant_folding: bool = False) -> None:
    """TorchScript exporter; BatchNormalization stays its own node (no Conv+BN fusion); the
    batch is dynamic on axis 0 of the input and `output_batch_axis` of the output."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"], output_names=[output_name],
            dynamic_axes={"input": {0: "batch"}, output_name: {output_batch_axis: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=constant_folding,
        )


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, output_name: str, opset: int = DYNAMO_OPSET) -> None:
    """torch.export exporter with a dynamic batch and the weights embedded."""
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["input"], output_names=[output_name],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    prog.save(str(path), external_data=False)


def embed_external_data(path: Path) -> int:
    """Make sure every initializer lives inside the .onnx file; returns how many were external."""
    model = onnx.load(str(path), load_external_data=True)
    ext = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    stray = sorted(p for p in path.parent.glob(path.name + "*") if p != path)
    if ext or stray:
        onnx.save_model(model, str(path), save_as_external_data=False)
        for p in stray:
            p.unlink()
    return len(ext) if (ext or stray) else -1
