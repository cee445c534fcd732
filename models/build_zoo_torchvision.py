"""Export torchvision classification architectures with random weights to ONNX for onnxprune coverage checks.

Run (CPU only, no network: ``weights=None``, nothing is downloaded; about 4 minutes on 2 cores, 1.8 GB)::

    pip install torch==2.13.0 torchvision==0.28.0 onnx onnxruntime onnxscript
    python models/build_zoo_torchvision.py [--out /tmp/tvzoo] [--only resnet18 swin_mini ...]
    python tools/zoo_table.py --folder /tmp/tvzoo

torchvision 0.28's C++ ops need not load with this torch: the import below stubs
``torch.library.register_fake`` while torchvision registers its fake kernels; the classification
models do not use those ops. Install it in a separate environment (or uninstall it after the
build): with its ops missing, ``import transformers`` fails in the same environment.

The weights are random (``torch.manual_seed(0)`` before each model is built, then torchvision's
own init; every ``nn.Linear`` weight redrawn with std fan_in**-0.5 so that the logits and the
transformer sublayers are O(1) rather than 0.02-scaled perturbations, ViT's zero-initialised
head included; BatchNorm scales and shifts random, its running statistics measured on random
inputs so that deep conv nets' activations do not vanish; in the nets without any norm layer,
alexnet and squeezenet1_1, every Conv and Linear is instead rescaled in turn so that its outputs
have zero mean and unit variance per channel on random inputs, else their logits hardly depend
on the input): the files test graph patterns, not accuracy. Every model is in eval mode, has
1000 classes and is exported twice, with a dynamic ``batch`` axis only:

* ``<name>.ts.onnx``     - TorchScript exporter (``dynamo=False``, opset 17, default eval-mode
  export: constant folding fuses BatchNorm into the Conv)
* ``<name>.dynamo.onnx`` - torch.export exporter (``dynamo=True``, opset 18, weights embedded;
  its optimiser folds BatchNorm into the Conv); a model whose dynamo export fails keeps its
  ``.ts.onnx`` and the reason is printed
* ``<name>.calib.npz``   - key ``input``: 96 float32 N(0,1) images [96,3,S,S], seed 1234

Input ``input`` [batch,3,S,S], output ``logits`` [batch,1000]. S is 64 except where the
architecture needs more: inception_v3 96 (75 at least), alexnet and vgg11_bn 224 (the
TorchScript exporter only exports AdaptiveAvgPool2d((6|7, 6|7)) when the feature map is a
multiple of the output size).

Models are torchvision's constructors as published except these, reduced to keep the files
small (same block types, fewer or narrower blocks):

* ``resnext26_32x4d``    ``ResNet(Bottleneck, [2, 2, 2, 2], groups=32, width_per_group=4)``
* ``convnext_tiny_half`` ``ConvNeXt`` with convnext_tiny's depths (3, 3, 9, 3) at half its widths
  (48-96-192-384), ``layer_scale=1`` (torchvision's 1e-6 makes every block an identity)
* ``vit_mini``           ``VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
  hidden_dim=64, mlp_dim=128)``
* ``swin_mini``          ``SwinTransformer`` like swin_t (patch 4, window 7, so the 16x16 and 8x8
  stages are padded) with embed_dim 32, depths (2, 2, 2, 2), heads (1, 2, 4, 8)
* ``maxvit_mini``        ``MaxVit`` at 64x64: stem 32, channels 32-64-128-256, layers (1, 1, 2, 1),
  head_dim 16, partition 2 (maxvit_t's partition 7 needs 224x224)

``EXTRA`` models (wide_resnet50_2, vgg11_bn: 276 and 531 MB a file) are built only when named
in ``--only``.

A file that fails to export or to match torch in onnxruntime (batch 3 and 1) is skipped with the
reason printed; the rest are still written. The exit status is 1 if anything was skipped.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.library

_register_fake = torch.library.register_fake
torch.library.register_fake = lambda *a, **k: (lambda f: f)  # torchvision's C++ ops may not load with this torch
try:
    import torchvision.models as tvm
finally:
    torch.library.register_fake = _register_fake
from torchvision.models.convnext import CNBlockConfig  # noqa: E402
from torchvision.models.resnet import Bottleneck  # noqa: E402
from zoo_common import build_each, calibrate_batchnorm, short, zoo_arguments  # noqa: E402

SEED = 0
CALIB_SEED = 1234
TS_OPSET = 17
DYNAMO_OPSET = 18
N_CALIB = 96
CHECK_BATCHES = (3, 1)


def tv(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    """A torchvision constructor by name, random weights."""
    return lambda: getattr(tvm, name)(weights=None, **kwargs)


def convnext_tiny_half() -> torch.nn.Module:
    setting = [CNBlockConfig(48, 96, 3), CNBlockConfig(96, 192, 3), CNBlockConfig(192, 384, 9), CNBlockConfig(384, None, 3)]
    return tvm.ConvNeXt(setting, stochastic_depth_prob=0.0, layer_scale=1.0)


# name -> (model builder, input size S of the [3,S,S] images)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "resnet18": (tv("resnet18"), 64),
    "resnet50": (tv("resnet50"), 64),
    "resnext26_32x4d": (lambda: tvm.ResNet(Bottleneck, [2, 2, 2, 2], groups=32, width_per_group=4), 64),
    "mobilenet_v2": (tv("mobilenet_v2"), 64),
    "mobilenet_v3_small": (tv("mobilenet_v3_small"), 64),
    "mobilenet_v3_large": (tv("mobilenet_v3_large"), 64),
    "efficientnet_b0": (tv("efficientnet_b0"), 64),
    "efficientnet_v2_s": (tv("efficientnet_v2_s"), 64),
    "regnet_y_400mf": (tv("regnet_y_400mf"), 64),
    "regnet_x_400mf": (tv("regnet_x_400mf"), 64),
    "shufflenet_v2_x0_5": (tv("shufflenet_v2_x0_5"), 64),
    "squeezenet1_1": (tv("squeezenet1_1"), 64),
    "densenet121": (tv("densenet121"), 64),
    "googlenet": (tv("googlenet", aux_logits=False, init_weights=True), 64),
    "inception_v3": (tv("inception_v3", aux_logits=False, init_weights=True), 96),
    "mnasnet0_5": (tv("mnasnet0_5"), 64),
    "convnext_tiny_half": (convnext_tiny_half, 64),
    "vit_mini": (lambda: tvm.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128), 64),
    "swin_mini": (lambda: tvm.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                              window_size=[7, 7], stochastic_depth_prob=0.0), 64),
    "maxvit_mini": (lambda: tvm.MaxVit(input_size=(64, 64), stem_channels=32, partition_size=2, block_channels=[32, 64, 128, 256],
                                       block_layers=[1, 1, 2, 1], head_dim=16, stochastic_depth_prob=0.0), 64),
    "alexnet": (tv("alexnet"), 224),
    "vgg11_bn": (tv("vgg11_bn"), 224),
    "wide_resnet50_2": (tv("wide_resnet50_2"), 64),
}
EXTRA = {"vgg11_bn", "wide_resnet50_2"}  # large files: built only with --only


def calibration(size: int, n: int, seed: int = CALIB_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


def rescale_linears(model: torch.nn.Module) -> None:
    """Linear weights of std fan_in**-0.5 (torchvision's 0.01/0.02/zero inits give near-zero logits
    and make transformer sublayers negligible next to the residual stream)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)


def standardise_layers(model: torch.nn.Module, size: int) -> None:
    """Data-dependent init for nets without norm layers: in forward order, each Conv / Linear gets
    the scale and shift that make its outputs zero-mean, unit-variance per channel on random inputs."""
    if any(isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)) for m in model.modules()):
        return
    x = torch.from_numpy(calibration(size, 32, seed=SEED))
    seen: list[torch.Tensor] = []
    for layer in [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]:
        seen.clear()
        hook = layer.register_forward_hook(lambda module, args, output: seen.append(output.clone()))  # before an in-place ReLU
        with torch.no_grad():
            model(x)
            hook.remove()
            y = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
            mean, std = y.mean(1), y.std(1).clamp_min(1e-6)
            layer.weight.div_(std.view(-1, *[1] * (layer.weight.dim() - 1)))
            layer.bias.copy_((layer.bias - mean) / std)


def export_ts(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=TS_OPSET, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=DYNAMO_OPSET, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def check(model: torch.nn.Module, path: Path, calib: np.ndarray) -> float:
    """Max |onnxruntime - torch| over batches of 3 and 1 (raises when it is not small)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in CHECK_BATCHES:
        got = session.run(None, {"input": calib[:n]})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(calib[:n])).numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"onnxruntime output {list(got.shape)} != torch {list(want.shape)}")
        diff = float(np.abs(got - want).max())
        if not diff <= 1e-3 * max(1.0, float(np.abs(want).max())):
            raise RuntimeError(f"onnxruntime differs from torch by {diff:.3g} at batch {n}")
        worst = max(worst, diff)
    return worst


def build(name: str, out_dir: Path) -> tuple[str, list[str]]:
    """Export one model with both exporters; returns a one-line summary and the files skipped
    (raises when the model cannot be built or neither export works)."""
    builder, size = ZOO[name]
    torch.manual_seed(SEED)
    model = builder().eval()
    rescale_linears(model)
    calibrate_batchnorm(model, lambda seed: model(torch.from_numpy(calibration(size, 16, seed=SEED + seed))))
    standardise_layers(model, size)
    calib = calibration(size, N_CALIB)
    example = torch.from_numpy(calib[:2])
    parts, skipped = [], []
    for kind, export in (("ts", export_ts), ("dynamo", export_dynamo)):
        path = out_dir / f"{name}.{kind}.onnx"
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export(model, example, path)
            diff = check(model, path, calib)
        except Exception as error:  # one exporter failing must not stop the other
            path.unlink(missing_ok=True)
            skipped.append(path.name)
            print(f"{path.name}: SKIPPED: {short(error)}", flush=True)
            continue
        parts.append(f"{kind} {path.stat().st_size / 1e6:.1f} MB {time.perf_counter() - start:.0f} s max |ort - torch| {diff:.1e}")
    if not parts:
        raise RuntimeError("no exporter worked")
    np.savez(out_dir / f"{name}.calib.npz", input=calib)
    params = sum(p.numel() for p in model.parameters())
    return f"{name}: {params:,} params, input [3,{size},{size}], " + "; ".join(parts), skipped


def main(argv: list[str] | None = None) -> int:
    args = zoo_arguments(__doc__, list(ZOO), "/tmp/tvzoo", argv)
    return build_each(args.only or [n for n in ZOO if n not in EXTRA], lambda name: build(name, args.out))

if __name__ == "__main__":
    sys.exit(main())
