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

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_reference as br  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from fashion_mnist import TEST_SEED, heldout_test_indices, load_fashion_mnist  # noqa: E402
from train_resnet_fmnist import BATCH, LR, train  # noqa: E402

NAME = "shufflenet_fmnist"
EPOCHS = 4
SEED = 0
ONNX_PATH = HERE / f"{NAME}.ts.onnx"
JSON_PATH = HERE / f"{NAME}.json"


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
    t_start = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    br.seed_everything(SEED)
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    test_idx = heldout_test_indices(1000, TEST_SEED)

    model = ShuffleNetFMNIST()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"== {NAME}: {n_params} parameters, {EPOCHS} epochs", flush=True)
    t_train = time.time()
    train(model, x_train, y_train, EPOCHS, SEED)
    train_seconds = time.time() - t_train
    torch_logits = br.torch_predict(model, x_test)
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    print(f"  torch test acc {torch_acc:.4f} (training {train_seconds:.0f}s)", flush=True)

    br.export_torchscript(model, torch.from_numpy(x_test[:2].copy()), ONNX_PATH)
    br.check_file(ONNX_PATH, "ts")
    ort_logits = br.ort_predict(ONNX_PATH, x_test)
    diff = float(np.abs(ort_logits - torch_logits).max())
    assert diff < 1e-3, diff
    for bs in (1, 7):
        d = float(np.abs(br.ort_predict(ONNX_PATH, x_test[:bs]) - torch_logits[:bs]).max())
        assert d < 1e-3, (bs, d)
    acc = float((ort_logits.argmax(1) == y_test).mean())
    sub_acc = float((ort_logits[test_idx].argmax(1) == y_test[test_idx]).mean())
    info = br.describe(ONNX_PATH)
    info.update({
        "model": NAME,
        "generator": "models/train_shufflenet_fmnist.py",
        "exporter": "torchscript",
        "architecture": "stem conv24; ShuffleNetV2 units 24->48 s2, 2x48; 48->96 s2, 2x96; conv1x1 192; GAP; FC 192->10",
        "torch_param_count": int(n_params),
        "training": {"seed": SEED, "epochs": EPOCHS, "batch_size": BATCH, "optimizer": "Adam", "lr": LR,
                     "lr_schedule": "cosine per step to 0", "train_images": int(len(x_train)), "seconds": round(train_seconds, 1),
                     "threads": 2, "deterministic_algorithms": True},
        "test_accuracy_ort": acc,
        "test_accuracy_torch": torch_acc,
        "test_images": int(len(y_test)),
        "test_subset_accuracy_ort": sub_acc,
        "max_abs_diff_vs_torch": diff,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": br.ort.__version__, "numpy": np.__version__},
    })
    JSON_PATH.write_text(json.dumps(info, indent=1) + "\n")
    print(f"  {ONNX_PATH.name}: {info['bytes']} bytes, acc {acc:.4f} (subset {sub_acc:.3f}); total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
