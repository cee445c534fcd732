"""Train a small GoogLeNet-style (Inception) CNN on Fashion-MNIST and export it to
``models/inception_fmnist.ts.onnx``: a real-weight model whose branches meet in Concats, so
that its spaces' sites are shared (docs/design.md, "Shared sites").

Rebuild (CPU only, a few minutes on 2 cores)::

    pip install torch==2.13.0 onnxscript
    apt-get update && apt-get install -y dataset-fashion-mnist
    python models/train_inception_fmnist.py

Architecture (every conv Conv-BN-ReLU, 28x28 input)::

    stem    Conv3x3(1->32)                                                      28x28
    mixed1  [1x1 16 | 1x1 16 -> 3x3 24 | 1x1 8 -> 3x3 12 -> 3x3 12 | pool3 -> 1x1 12] = 64
    MaxPool 2                                                                   14x14
    mixed2  [1x1 32 | 1x1 32 -> 3x3 48 | 1x1 12 -> 3x3 24 -> 3x3 24 | pool3 -> 1x1 24] = 128
    mixed3  the same as mixed2 on 128 channels                                  = 128
    MaxPool 2                                                                   7x7
    mixed4  [1x1 48 | 1x1 48 -> 3x3 64 | 1x1 16 -> 3x3 32 -> 3x3 32 | pool3 -> 1x1 32] = 176
    GlobalAveragePool, Linear(176->10)

Exported with the TorchScript exporter like ``resnet_fmnist.ts.onnx`` (BatchNormalization kept
as nodes): input ``input`` [batch,1,28,28] -> output ``logits`` [batch,10]. Writes
``inception_fmnist.ts.onnx`` and ``inception_fmnist.json``; seeded, deterministic on 2 threads.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from train_resnet_fmnist import train_and_write  # noqa: E402


def conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Mixed(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max pool -> 1x1."""

    def __init__(self, cin: int, one: int, mid: int, three: int, narrow: int, double: int, pool: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, one, 1)
        self.branch3 = nn.Sequential(conv_bn(cin, mid, 1), conv_bn(mid, three, 3))
        self.branch5 = nn.Sequential(conv_bn(cin, narrow, 1), conv_bn(narrow, double, 3), conv_bn(double, double, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


class InceptionFMNIST(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32, 3)
        self.mixed1 = Mixed(32, 16, 16, 24, 8, 12, 12)
        self.mixed2 = Mixed(64, 32, 32, 48, 12, 24, 24)
        self.mixed3 = Mixed(128, 32, 32, 48, 12, 24, 24)
        self.mixed4 = Mixed(128, 48, 48, 64, 16, 32, 32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(176, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.mixed1(self.stem(x)))
        x = self.pool(self.mixed3(self.mixed2(x)))
        return self.fc(self.mixed4(x).mean((2, 3)))


def main() -> None:
    train_and_write(InceptionFMNIST, "inception_fmnist", "models/train_inception_fmnist.py",
                    "stem conv32; Inception mixed 64 (28x28); pool; 2x mixed 128 (14x14); pool; mixed 176 (7x7); GAP; FC 176->10")


if __name__ == "__main__":
    main()
