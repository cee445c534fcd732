"""Train a small ShuffleNetV2 on Fashion-MNIST and export it to ``models/shufflenet_fmnist.ts.onnx``.

Rebuild (CPU only, a few minutes on 2 cores)::

    pip install torch==2.13.0 onnxscript
    apt-get update && apt-get install -y dataset-fashion-mnist
    python models/train_shufflenet_fmnist.py

The model uses torchvision's ShuffleNetV2 unit (28x28 input, no stem pooling)::

    stem   Conv3x3(1->24)-BN-ReLU                                  28x28
    stage2 unit(24->48, stride 2), 2 x unit(48)                    14x14
    stage3 unit(48->96, stride 2), 2 x unit(96)                     7x7
    conv5  Conv1x1(96->192)-BN-ReLU, GlobalAveragePool, Linear(192->10)

A stride-1 unit splits its channels in halves, passes one and runs the other through
1x1 conv - depthwise 3x3 - 1x1 conv; a stride-2 unit runs both branches on the whole input.
The halves are concatenated and shuffled (`view(B, 2, C/2, H, W).transpose(1, 2)`), so each
unit's output channels are interleaved with the channels it passed on: onnxprune writes the
shuffle as a Gather (docs/design.md, "torchvision classifiers").

Exported with the TorchScript exporter like ``resnet_fmnist.ts.onnx`` (BatchNormalization kept
as nodes): input ``input`` [batch,1,28,28] -> output ``logits`` [batch,10]. Writes
``shufflenet_fmnist.ts.onnx`` and ``shufflenet_fmnist.json``; seeded, deterministic on 2 threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from train_resnet_fmnist import train_and_write  # noqa: E402


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class Unit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, relu=False), conv_bn(cin, half, 1))
        self.branch2 = nn.Sequential(conv_bn(cin if stride > 1 else half, half, 1),
                                     conv_bn(half, half, 3, stride, groups=half, relu=False), conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetFMNIST(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 24, 3)
        self.stage2 = nn.Sequential(Unit(24, 48, 2), Unit(48, 48, 1), Unit(48, 48, 1))
        self.stage3 = nn.Sequential(Unit(48, 96, 2), Unit(96, 96, 1), Unit(96, 96, 1))
        self.conv5 = conv_bn(96, 192, 1)
        self.fc = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage3(self.stage2(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    train_and_write(ShuffleNetFMNIST, "shufflenet_fmnist", "models/train_shufflenet_fmnist.py",
                    "stem conv24; ShuffleNetV2 units 24->48 s2, 2x48; 48->96 s2, 2x96; conv1x1 192; GAP; FC 192->10")


if __name__ == "__main__":
    main()
