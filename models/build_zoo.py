"""Build a small reference zoo of deployed CNN architectures for onnxprune tests.

Rebuild (CPU only, about a minute on 2 cores)::

    pip install torch==2.13.0 onnxscript
    python models/build_zoo.py

No training: the weights are random but seeded, and every BatchNorm gets random
``weight``/``bias``/``running_mean``/``running_var`` (var > 0) so that no BN is an
identity. Models are run and exported in eval mode.

Writes, into ``models/zoo/``:

* ``<name>.ts.onnx``     - TorchScript exporter (``dynamo=False``), opset 17,
  BatchNormalization kept as separate nodes (``training=PRESERVE``,
  ``do_constant_folding=False``)
* ``<name>.dynamo.onnx`` - torch.export exporter (``dynamo=True``), opset 18, weights embedded
  (its optimiser folds eval-mode BN into the preceding Conv)
* ``calib.npz``   - key ``input``, [64,3,32,32] float32, N(0,1), seed 1234 (all models but unets)
* ``calib64.npz`` - key ``input``, [32,3,64,64] float32, N(0,1), seed 1234 (unets)
* ``manifest.json`` - per file: model, exporter, input/output shapes, calib file, op counts,
  bytes, onnxruntime-vs-torch max abs diff, plus a ``patterns`` summary (Split/Slice,
  Resize inputs, grouped/depthwise Conv, ConvTranspose, SiLU/SE patterns, BN count).

Every file has input ``input`` and output ``output`` with a dynamic batch dimension, passes
``onnx.checker.check_model(full_check=True)`` and is compared against torch at batch 2 (and
batch 1 and 3 for the dynamic-batch sanity check).

Models (all narrow, a few 10k parameters each):

* ``resnet18s``    torchvision ResNet-18 topology (7x7/2 stem + maxpool, BasicBlock x[2,2,2,2],
  widths 8/16/32/64, 1x1-conv+BN downsample, AdaptiveAvgPool + flatten + fc), 10 classes
* ``resnet50s``    torchvision ResNet-50 style Bottleneck (1x1-3x3-1x1, expansion 4, stride on
  the 3x3), blocks [2,1,1,1], planes 8/16/32/64
* ``mobilenetv2s`` MobileNetV2 inverted residuals (expand 1x1-BN-ReLU6, dw 3x3-BN-ReLU6,
  project 1x1-BN, residual when stride 1 and in == out; first block t=1 has no expand)
* ``densenets``    DenseNet-BC (torchvision layout): 2 dense blocks of 3 layers, growth 8,
  bn_size 4, BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, Concat along channels, transition
  BN-ReLU-Conv1x1-AvgPool2
* ``resnexts``     ResNeXt bottleneck (grouped 3x3, groups 4 then 8), blocks [2,1,1]
* ``effnets``      EfficientNet MBConv with squeeze-excitation (GAP - 1x1 reduce - SiLU -
  1x1 expand - Sigmoid - Mul), SiLU everywhere, 3x3 and 5x5 depthwise
* ``c2f``          YOLOv8-style mini backbone/neck: Conv(=Conv-BN-SiLU), C2f with
  ``chunk(2, 1)`` + bottlenecks + Concat, SPPF (3 chained MaxPool5 + Concat), nearest
  Upsample x2 + skip Concat, head Conv3x3 + 1x1 conv -> feature map [N,14,8,8]
* ``unets``        small UNet on 3x64x64: 2 down levels (conv-BN-ReLU x2 + maxpool), bottleneck,
  up path with ConvTranspose2d(stride 2) on the deep level and bilinear nn.Upsample on the
  shallow one, skip Concat, final 1x1 conv -> [N,2,64,64]
* ``yolov8s``      YOLOv8n topology on 3x64x64 (backbone Conv/C2f x4 + SPPF, PAN neck, Detect head
  with the 4 x 16 DFL box layout, anchors for strides 8/16/32) -> [N,14,84]; calib64.npz

``python models/build_zoo.py --only yolov8s`` builds one model and merges it into the manifest.
Keras (NHWC) models: ``models/build_zoo_keras.py``.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ZOO = HERE / "zoo"

SEED = 0
CALIB_SEED = 1234
sys.path.insert(0, str(Path(__file__).resolve().parent))
from functools import partial  # noqa: E402

import torch_export  # noqa: E402
from torch_export import embed_external_data, seed_everything, value_shape  # noqa: E402

export_torchscript = partial(torch_export.export_torchscript, output_name="output")
export_dynamo = partial(torch_export.export_dynamo, output_name="output")

TS_OPSET = 17
DYNAMO_OPSET = 18
MAX_FILE_BYTES = 1024 * 1024
CHECK_BATCH = 2


# =========================================================================== models
# ---------------------------------------------------------------- ResNet (torchvision)
def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (ResNet v1.5: stride on the 3x3); ResNeXt when groups > 1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet with configurable stage widths."""

    def __init__(self, block, layers, widths, num_classes: int = 10, groups: int | list = 1,
                 width_per_group: int = 64, stem_width: int | None = None) -> None:
        super().__init__()
        self.inplanes = stem_width or widths[0]
        self.base_width = width_per_group
        if isinstance(groups, int):
            groups = [groups] * len(layers)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for i, (n, w, g) in enumerate(zip(layers, widths, groups, strict=True)):
            stages.append(self._make_layer(block, w, n, stride=1 if i == 0 else 2, groups=g))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, groups: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, groups, self.base_width)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=groups, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18s() -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], [8, 16, 32, 64])


def resnet50s() -> nn.Module:
    return ResNet(Bottleneck, [2, 1, 1, 1], [8, 16, 32, 64])


def resnexts() -> nn.Module:
    # ResNeXt-style: width = planes * base_width/64 * groups -> 16/32/64 grouped channels
    return ResNet(Bottleneck, [2, 1, 1], [8, 16, 32], groups=[4, 4, 8], width_per_group=32,
                  stem_width=16)


# ---------------------------------------------------------------- MobileNetV2
class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU6) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU6, nn.ReLU, nn.SiLU) else act())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, k=1))
        layers += [
            ConvBNAct(hidden, hidden, k=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2S(nn.Module):
    # (t, c, n, s) like torchvision's inverted_residual_setting, narrowed
    SETTING = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 3, 2), (6, 24, 2, 1), (6, 32, 1, 2)]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        cin = 16
        feats: list[nn.Module] = [ConvBNAct(3, cin, 3, stride=2)]
        for t, c, n, s in self.SETTING:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(ConvBNAct(cin, 64, k=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------- DenseNet (torchvision)
class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNetS(nn.Module):
    def __init__(self, growth_rate: int = 8, block_config=(3, 3), num_init_features: int = 16,
                 bn_size: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        feats: list[nn.Module] = [
            nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(num_init_features), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        nf = num_init_features
        for i, n in enumerate(block_config):
            feats.append(DenseBlock(n, nf, bn_size, growth_rate))
            nf += n * growth_rate
            if i != len(block_config) - 1:
                feats.append(Transition(nf, nf // 2))
                nf //= 2
        feats.append(nn.BatchNorm2d(nf))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(nf, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# ---------------------------------------------------------------- EfficientNet (MBConv + SE)
class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with SiLU / Sigmoid (as EfficientNet uses it)."""

    def __init__(self, cin: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.avgpool(x)
        s = self.fc2(self.activation(self.fc1(s)))
        return self.scale_activation(s) * x


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand_ratio
        layers: list[nn.Module] = []
        if hidden != cin:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.SiLU))
        layers.append(ConvBNAct(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4)))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x  # StochasticDepth is the identity in eval mode
        return out


class EffNetS(nn.Module):
    # (expand, kernel, stride, cin, cout, layers) like torchvision's MBConvConfig list, narrowed
    SETTING = [(1, 3, 1, 16, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 16, 2), (6, 3, 1, 16, 24, 1)]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        feats: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=nn.SiLU)]
        for e, k, s, cin, cout, n in self.SETTING:
            for i in range(n):
                feats.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        feats.append(ConvBNAct(24, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------- YOLOv8 C2f / SPPF
class YConv(nn.Module):
    """ultralytics Conv: Conv2d(bias=False) + BN + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class YBottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = YConv(c1, c_, 3)
        self.cv2 = YConv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5) -> None:
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = YConv(c1, 2 * self.c, 1)
        self.cv2 = YConv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = YConv(c1, c_, 1)
        self.cv2 = YConv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    """Mini YOLOv8 backbone + one FPN step + a detect-like head on the stride-4 level."""

    def __init__(self, nc: int = 10) -> None:
        super().__init__()
        self.b0 = YConv(3, 16, 3, 2)      # 16x16
        self.b1 = YConv(16, 32, 3, 2)     # 8x8
        self.b2 = C2f(32, 32, n=1, shortcut=True)
        self.b3 = YConv(32, 64, 3, 2)     # 4x4
        self.b4 = C2f(64, 64, n=2, shortcut=True)
        self.b5 = SPPF(64, 64)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.n0 = C2f(64 + 32, 32, n=1, shortcut=False)
        self.h0 = YConv(32, 32, 3)
        self.h1 = nn.Conv2d(32, 4 + nc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.b5(self.b4(self.b3(p3)))
        n = self.n0(torch.cat([self.up(p4), p3], 1))
        return self.h1(self.h0(n))


class DFL(nn.Module):
    """ultralytics' Distribution Focal Loss integral: softmax over reg_max bins, fixed arange conv."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """ultralytics' YOLOv8 Detect head (inference): per level a box branch (2 Conv + 1x1 to 4 x 16
    DFL bins) and a class branch, flattened and joined over levels, DFL -> ltrb -> xywh x stride."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], sizes: tuple[int, ...], reg_max: int = 16) -> None:
        super().__init__()
        self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
        # ultralytics: c2 = max(16, ch[0] // 4, 4 * reg_max) = 64; 32 keeps the file under 1 MB
        c2, c3 = max(16, ch[0] // 4, reg_max * 2), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(YConv(x, c2, 3), YConv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(YConv(x, c3, 3), YConv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = DFL(reg_max)
        points, stride = [], []
        for s, n in zip(strides, sizes, strict=True):  # make_anchors: cell centres, fixed by the input size
            yy, xx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            points.append(torch.stack((xx, yy), -1).view(-1, 2))
            stride.append(torch.full((n * n, 1), float(s)))
        self.register_buffer("anchors", torch.cat(points).transpose(0, 1).unsqueeze(0))
        self.register_buffer("strides", torch.cat(stride).transpose(0, 1))

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        shape = xs[0].shape
        x = torch.cat([torch.cat((b(x), c(x)), 1).view(shape[0], self.no, -1) for x, b, c in zip(xs, self.cv2, self.cv3, strict=True)], 2)
        box, cls = x.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8S(nn.Module):
    """YOLOv8n topology (ultralytics yolov8.yaml) at 1/4 to 1/8 of its widths on 64x64 inputs:
    backbone Conv/C2f x4 + SPPF, PAN neck (Upsample + Concat + C2f, strided Conv + Concat + C2f)
    and the Detect head on strides 8/16/32 -> [N, 4 + nc, 84]."""

    def __init__(self, nc: int = 10, w: tuple[int, ...] = (4, 8, 16, 32, 32)) -> None:
        super().__init__()
        self.b0, self.b1, self.b2 = YConv(3, w[0], 3, 2), YConv(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True)
        self.b3, self.b4 = YConv(w[1], w[2], 3, 2), C2f(w[2], w[2], 2, True)
        self.b5, self.b6 = YConv(w[2], w[3], 3, 2), C2f(w[3], w[3], 2, True)
        self.b7, self.b8, self.b9 = YConv(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4])
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.h12, self.h15 = C2f(w[4] + w[3], w[3]), C2f(w[3] + w[2], w[2])
        self.h16, self.h18 = YConv(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.h19, self.h21 = YConv(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4])
        self.detect = Detect(nc, (w[2], w[3], w[4]), (8, 16, 32), (8, 4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p4 = self.b6(self.b5(p3))
        p5 = self.b9(self.b8(self.b7(p4)))
        n4 = self.h12(torch.cat([self.up(p5), p4], 1))
        n3 = self.h15(torch.cat([self.up(n4), p3], 1))
        n4 = self.h18(torch.cat([self.h16(n3), n4], 1))
        n5 = self.h21(torch.cat([self.h19(n4), p5], 1))
        return self.detect([n3, n4, n5])


# ---------------------------------------------------------------- UNet
class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        mid = mid or cout
        super().__init__(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNetS(nn.Module):
    def __init__(self, n_classes: int = 2) -> None:
        super().__init__()
        self.inc = DoubleConv(3, 8)                                  # 64x64
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(8, 16))   # 32x32
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(16, 32))  # 16x16 bottleneck
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)           # -> 32x32
        self.conv_up1 = DoubleConv(32, 16)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)  # -> 64x64
        self.conv_up2 = DoubleConv(16 + 8, 8, mid=12)
        self.outc = nn.Conv2d(8, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        y = self.conv_up1(torch.cat([x2, self.up1(x3)], 1))
        y = self.conv_up2(torch.cat([x1, self.up2(y)], 1))
        return self.outc(y)


# (factory, input CHW, calib file)
MODELS = {
    "resnet18s": (resnet18s, (3, 32, 32), "calib.npz"),
    "resnet50s": (resnet50s, (3, 32, 32), "calib.npz"),
    "mobilenetv2s": (MobileNetV2S, (3, 32, 32), "calib.npz"),
    "densenets": (DenseNetS, (3, 32, 32), "calib.npz"),
    "resnexts": (resnexts, (3, 32, 32), "calib.npz"),
    "effnets": (EffNetS, (3, 32, 32), "calib.npz"),
    "c2f": (C2fNet, (3, 32, 32), "calib.npz"),
    "unets": (UNetS, (3, 64, 64), "calib64.npz"),
    "yolov8s": (YOLOv8S, (3, 64, 64), "calib64.npz"),
}


# =========================================================================== helpers
@torch.no_grad()
def randomize_bn(model: nn.Module, gen: torch.Generator) -> int:
    """Give every BatchNorm non-trivial affine params and running statistics."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=gen) * 1.0 + 0.5)        # [0.5, 1.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)   # [0.5, 2.0)
            n += 1
    return n


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def check_file(path: Path) -> onnx.ModelProto:
    embed_external_data(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inits = {t.name for t in g.initializer}
    ins = [i.name for i in g.input if i.name not in inits]
    assert ins == ["input"], ins
    assert [o.name for o in g.output] == ["output"], [o.name for o in g.output]
    for vi in (g.input[0], g.output[0]):
        s = value_shape(vi)
        assert isinstance(s[0], str) and s[0], f"{path.name}: batch dim not dynamic: {s}"
    size = path.stat().st_size
    assert size < MAX_FILE_BYTES, f"{path.name}: {size} bytes >= 1 MB"
    for n in g.node:
        if n.op_type == "BatchNormalization":
            assert len(n.output) == 1, f"{path.name}: BN with training outputs"
            for a in n.attribute:
                if a.name == "training_mode":
                    assert a.i == 0, f"{path.name}: BN training_mode=1"
    return model


# ---------------------------------------------------------------- graph pattern summary
def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def patterns(model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def const_value(name: str):
        if name in inits:
            return onnx.numpy_helper.to_array(inits[name]).tolist()
        p = producer.get(name)
        if p is not None and p.op_type == "Constant":
            return onnx.numpy_helper.to_array(_attr(p, "value")).tolist()
        return None

    def source(name: str) -> str:
        if not name:
            return "absent"
        if name in inits:
            return "initializer"
        p = producer.get(name)
        if p is None:
            return "graph input"
        return f"{p.op_type} node"

    def upstream_ops(name: str, depth: int = 12) -> list[str]:
        seen, stack, ops = set(), [(name, 0)], set()
        while stack:
            t, d = stack.pop()
            p = producer.get(t)
            if p is None or id(p) in seen or d > depth:
                continue
            seen.add(id(p))
            ops.add(p.op_type)
            stack.extend((i, d + 1) for i in p.input if i)
        return sorted(ops)

    def fold(name: str):
        """Value of a tensor computed only from constants (no Shape / graph input), else None."""
        nodes, stack, seen = [], [name], set()
        while stack:
            t = stack.pop()
            if not t or t in inits or t in seen:
                continue
            seen.add(t)
            p = producer.get(t)
            if p is None or p.op_type == "Shape":
                return None
            nodes.append(p)
            stack.extend(p.input)
        order = [n for n in g.node if any(n is m for m in nodes)]
        try:
            from onnx.reference import ReferenceEvaluator
            needed = {i for n in order for i in n.input}
            sub = onnx.helper.make_model(
                onnx.helper.make_graph(order, "fold", [],
                                       [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                                       [inits[i] for i in needed if i in inits]),
                opset_imports=list(model.opset_import))
            return ReferenceEvaluator(sub).run(None, {})[0].tolist()
        except Exception:  # pragma: no cover - best effort only
            return None

    def describe_input(n: onnx.NodeProto, i: int):
        t = n.input[i] if len(n.input) > i else ""
        if not t:
            return None
        v = const_value(t)
        if v is not None:
            return {"source": source(t), "value": v}
        d = {"source": source(t), "upstream_ops": upstream_ops(t)}
        fv = fold(t)
        if fv is not None:
            d["constant_foldable_value"] = fv
        else:
            d["depends_on_Shape"] = "Shape" in d["upstream_ops"]
        return d

    out: dict = {}
    splits = []
    for n in g.node:
        if n.op_type == "Split":
            sp = n.input[1] if len(n.input) > 1 else ""
            splits.append({
                "axis": _attr(n, "axis", 0), "outputs": len(n.output),
                "split_input": source(sp), "split_value": const_value(sp) if sp else None,
                "num_outputs_attr": _attr(n, "num_outputs"),
            })
    if splits:
        out["Split"] = splits
    slices = []
    for n in g.node:
        if n.op_type == "Slice":
            slices.append({k: describe_input(n, i)
                           for i, k in enumerate(["data", "starts", "ends", "axes", "steps"]) if i > 0})
    if slices:
        out["Slice"] = slices
    resizes = []
    for n in g.node:
        if n.op_type == "Resize":
            r = {"mode": _attr(n, "mode", b"nearest"),
                 "coordinate_transformation_mode": _attr(n, "coordinate_transformation_mode", b"half_pixel"),
                 "nearest_mode": _attr(n, "nearest_mode", b"round_prefer_floor")}
            r = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in r.items()}
            for i, nm in enumerate(["roi", "scales", "sizes"], 1):
                r[nm] = describe_input(n, i)
            resizes.append(r)
    if resizes:
        out["Resize"] = resizes
    convs = [n for n in g.node if n.op_type == "Conv"]
    grouped, depthwise = 0, 0
    for n in convs:
        gr = _attr(n, "group", 1)
        if gr > 1:
            w = inits.get(n.input[1])
            if w is not None and w.dims[1] == 1 and gr == w.dims[0]:
                depthwise += 1
            else:
                grouped += 1
    out["Conv"] = {"total": len(convs), "grouped_non_depthwise": grouped, "depthwise": depthwise,
                   "groups_seen": sorted({_attr(n, "group", 1) for n in convs})}
    cts = [n for n in g.node if n.op_type == "ConvTranspose"]
    if cts:
        out["ConvTranspose"] = [{"strides": _attr(n, "strides"), "kernel_shape": _attr(n, "kernel_shape"),
                                 "group": _attr(n, "group", 1), "has_bias": len(n.input) > 2,
                                 "weight_shape": list(inits[n.input[1]].dims) if n.input[1] in inits else None}
                                for n in cts]
    # SiLU = x * Sigmoid(x) (same tensor feeds both); SE gate = Sigmoid(s) * x with s from a 1x1 conv
    silu, se_mul, other_sig = 0, 0, 0
    for n in g.node:
        if n.op_type != "Sigmoid":
            continue
        x = n.input[0]
        muls = [c for c in consumers[n.output[0]] if c.op_type == "Mul"]
        if muls and all(x in c.input for c in muls):
            silu += 1
        elif muls:
            se_mul += 1
        else:
            other_sig += 1
    out["Sigmoid_patterns"] = {"silu_x_mul_sigmoid_x": silu, "se_gate_sigmoid_mul_feature": se_mul,
                               "other": other_sig}
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    out["BatchNormalization"] = {
        "count": len(bns),
        "producers": dict(collections.Counter(source(n.input[0]) for n in bns)),
    }
    out["Concat"] = [{"axis": _attr(n, "axis"), "n_inputs": len(n.input),
                      "inputs_from": [source(i) for i in n.input]}
                     for n in g.node if n.op_type == "Concat"]
    pools = []
    for n in g.node:
        if n.op_type == "GlobalAveragePool":
            pools.append({"op": "GlobalAveragePool"})
        elif n.op_type == "ReduceMean":
            pools.append({"op": "ReduceMean", "axes": describe_input(n, 1) or _attr(n, "axes"),
                          "keepdims": _attr(n, "keepdims", 1)})
    if pools:
        out["global_pool"] = pools
    clips = [n for n in g.node if n.op_type == "Clip"]
    if clips:
        out["Clip"] = sorted({json.dumps({"min": describe_input(n, 1), "max": describe_input(n, 2)})
                              for n in clips})
        out["Clip"] = [json.loads(c) for c in out["Clip"]]
    shape_ops = [n.op_type for n in g.node if n.op_type in ("Shape", "Gather", "Unsqueeze", "Reshape",
                                                            "Flatten", "ConstantOfShape", "Expand")]
    out["shape_ops"] = dict(collections.Counter(shape_ops))
    reshape_shapes = []
    for n in g.node:
        if n.op_type == "Reshape":
            reshape_shapes.append({"shape": const_value(n.input[1]), "shape_input": source(n.input[1]),
                                   "allowzero": _attr(n, "allowzero", 0)})
    if reshape_shapes:
        out["Reshape"] = reshape_shapes
    non_std = sorted({n.domain for n in g.node if n.domain not in ("", "ai.onnx")})
    if non_std:
        out["non_standard_domains"] = non_std
    out["functions"] = len(model.functions)
    return out


def describe(path: Path, model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": value_shape(i)} for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": value_shape(o)} for o in g.output],
        "op_counts": dict(sorted(ops.items())),
        "node_count": len(g.node),
        "initializer_count": len(g.initializer),
        "initializer_elements": int(sum(np.prod(t.dims, dtype=np.int64) for t in g.initializer)),
        "patterns": patterns(model),
    }


# =========================================================================== main
def main() -> int:
    """Build every model, or with ``--only NAME ...`` just those (merged into the manifest; the
    other files and the calibration sets are left as they are)."""
    only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else None
    t_start = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    # "torchvision is not installed. Skipping torchvision::nms" etc. - harmless
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    ZOO.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}", flush=True)
    try:
        import onnxscript
        onnxscript_version = onnxscript.__version__
    except Exception:  # pragma: no cover
        onnxscript_version = None

    rng = np.random.default_rng(CALIB_SEED)
    calib = {
        "calib.npz": rng.standard_normal((64, 3, 32, 32), dtype=np.float32),
        "calib64.npz": rng.standard_normal((32, 3, 64, 64), dtype=np.float32),
    }
    for fname, arr in calib.items():
        if only is None:
            np.savez_compressed(ZOO / fname, input=arr)

    manifest: dict = {
        "generator": "models/build_zoo.py",
        "versions": {"torch": torch.__version__, "onnxscript": onnxscript_version,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "note": "random seeded weights (no training); every BN has random weight/bias/running stats; "
                "eval mode. *.ts.onnx: TorchScript opset 17, BN kept (PRESERVE, no constant folding). "
                "*.dynamo.onnx: torch.export opset 18 (BN folded into Conv by the exporter's optimiser).",
        "calibration": {
            "calib.npz": {"key": "input", "shape": [64, 3, 32, 32], "dtype": "float32",
                          "dist": "standard normal", "seed": CALIB_SEED, "generator": "numpy default_rng"},
            "calib64.npz": {"key": "input", "shape": [32, 3, 64, 64], "dtype": "float32",
                            "dist": "standard normal", "seed": CALIB_SEED,
                            "generator": "numpy default_rng (drawn after calib.npz)"},
        },
        "models": {},
        "files": {},
        "errors": {},
    }

    if only is not None:
        kept = json.loads((ZOO / "manifest.json").read_text())
        manifest.update({k: kept[k] for k in ("models", "files", "errors", "calibration")})
        manifest["versions"] = {**kept["versions"], **manifest["versions"]}
    for idx, (name, (factory, chw, calib_file)) in enumerate(MODELS.items()):
        if only is not None and name not in only:
            continue
        print(f"== {name}", flush=True)
        seed_everything(SEED + idx)
        model = factory()
        n_bn = randomize_bn(model, torch.Generator().manual_seed(SEED + 100 + idx))
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        example = torch.from_numpy(calib[calib_file][:CHECK_BATCH].copy())
        with torch.no_grad():
            ref = model(example).numpy()
            ref_odd = {bs: model(torch.from_numpy(calib[calib_file][:bs].copy())).numpy() for bs in (1, 3)}
        manifest["models"][name] = {
            "torch_param_count": int(n_params), "batchnorm_modules": n_bn,
            "input_shape": ["batch", *chw], "output_shape_torch": list(ref.shape[1:]),
            "calib": calib_file, "torch_output_absmax_batch2": float(np.abs(ref).max()),
            "files": [],
        }
        for kind, exporter in (("ts", export_torchscript), ("dynamo", export_dynamo)):
            path = ZOO / f"{name}.{kind}.onnx"
            key = path.name
            t0 = time.time()
            try:
                exporter(model, example, path)
                om = check_file(path)
                out = ort_run(path, calib[calib_file][:CHECK_BATCH])
                assert out.shape == ref.shape, (out.shape, ref.shape)
                diff = float(np.abs(out - ref).max())
                odd = {bs: float(np.abs(ort_run(path, calib[calib_file][:bs]) - r).max())
                       for bs, r in ref_odd.items()}
                tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
                assert diff < tol and max(odd.values()) < tol, (diff, odd, tol)
                info = describe(path, om)
                info.update({
                    "model": name,
                    "exporter": "torchscript" if kind == "ts" else "torch.export (dynamo)",
                    "export_kwargs": (
                        {"dynamo": False, "opset_version": TS_OPSET, "dynamic_axes": "batch",
                         "training": "PRESERVE", "do_constant_folding": False}
                        if kind == "ts" else
                        {"dynamo": True, "opset_version": DYNAMO_OPSET,
                         "dynamic_shapes": "torch.export.Dim('batch', min=1, max=65536)",
                         "external_data": False}),
                    "input_shape": ["batch", *chw],
                    "calib": calib_file,
                    "max_abs_diff_vs_torch_batch2": diff,
                    "max_abs_diff_vs_torch_batch1_3": odd,
                })
                manifest["files"][key] = info
                manifest["models"][name]["files"].append(key)
                oc = info["op_counts"]
                print(f"  {key}: {info['bytes']} bytes, diff {diff:.2e}, odd {max(odd.values()):.2e}, "
                      f"ops {oc} ({time.time() - t0:.1f}s)", flush=True)
            except Exception as e:  # keep going; record the failure
                msg = f"{type(e).__name__}: {e}"
                print(f"  {key}: FAILED {msg}", flush=True)
                traceback.print_exc()
                manifest["errors"][key] = msg[:4000]
                if path.exists():
                    path.unlink()

    total = sum(p.stat().st_size for p in ZOO.iterdir() if p.is_file())
    manifest["total_bytes_excluding_manifest"] = int(total)
    with open(ZOO / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(manifest['files'])} models, {len(manifest['errors'])} errors, "
          f"{total / 1e6:.2f} MB; total {time.time() - t_start:.0f}s", flush=True)
    return 1 if manifest["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
