"""Train and export the onnxprune reference models on Fashion-MNIST.

Rebuild (CPU only, ~2 minutes on 2 cores)::

    pip install torch==2.13.0 onnxscript
    apt-get update && apt-get install -y dataset-fashion-mnist
    python models/build_reference.py

Writes, next to this file:

* ``vgg_bn.ts.onnx`` / ``vgg_bn.dynamo.onnx`` - small VGG-style CNN with BatchNorm,
  input ``input`` [N,1,28,28], output ``logits`` [N,10]
* ``mlp.ts.onnx`` / ``mlp.dynamo.onnx`` - 3-layer MLP (ReLU + exact-erf GELU),
  input ``input`` [N,784], output ``logits`` [N,10]
* ``data/fmnist_calib.npz`` (512 train images, key ``input`` [512,1,28,28]),
  ``data/fmnist_calib_flat.npz`` (same images, key ``input`` [512,784]),
  ``data/fmnist_test.npz`` (1000 test images, keys ``input`` [1000,1,28,28], ``labels``)
* ``reference.json`` - accuracy (onnxruntime, full 10k test set), op counts, params,
  opset, input/output names and shapes for every .onnx file.

``*.ts.onnx`` come from the TorchScript exporter (``dynamo=False``, opset 17);
BatchNormalization is kept as separate nodes (not fused into Conv).
``*.dynamo.onnx`` come from the torch.export exporter (``dynamo=True``, opset 18),
whose optimiser folds BatchNormalization into the preceding Conv.
All files have a dynamic batch dimension named ``batch`` and embed their weights.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from fashion_mnist import (  # noqa: E402
    CALIB_SEED,
    MEAN,
    STD,
    TEST_SEED,
    calibration_indices,
    heldout_test_indices,
    load_fashion_mnist,
)

SEED = 0
EPOCHS = {"vgg_bn": 5, "mlp": 10}
BATCH = 128
LR = 1e-3
from functools import partial  # noqa: E402

import torch_export  # noqa: E402
from torch_export import embed_external_data, seed_everything, value_shape  # noqa: E402

export_torchscript = partial(torch_export.export_torchscript, output_name="logits")
export_dynamo = partial(torch_export.export_dynamo, output_name="logits")

TS_OPSET = 17
DYNAMO_OPSET = 18
N_CALIB = 512
N_TEST_SUBSET = 1000
MAX_FILE_BYTES = 2 * 1024 * 1024
DATA_DIR = HERE / "data"


# --------------------------------------------------------------------------- models
class VGGBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(),
            nn.Linear(256, 128), nn.GELU(),  # exact (erf) GELU
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------- helpers
def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    n = xt.shape[0]
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        t0 = time.time()
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, n, BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = xt[idx], yt[idx]
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f} "
              f"train-acc {correct / total:.4f} ({time.time() - t0:.1f}s)", flush=True)
    model.eval()


@torch.no_grad()
def torch_predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + 1000])).numpy() for i in range(0, len(x), 1000)]
    return np.concatenate(outs)


def ort_predict(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + 1000]})[0] for i in range(0, len(x), 1000)]
    return np.concatenate(outs)


def describe(path: Path) -> dict:
    model = onnx.load(str(path))
    g = model.graph
    init_names = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    n_params = int(sum(np.prod(t.dims, dtype=np.int64) for t in g.initializer))
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": value_shape(i)} for i in g.input if i.name not in init_names],
        "outputs": [{"name": o.name, "shape": value_shape(o)} for o in g.output],
        "op_types": sorted(ops),
        "op_counts": dict(sorted(ops.items())),
        "node_count": len(g.node),
        "initializer_count": len(g.initializer),
        "initializer_elements": n_params,
        "op_sequence": [n.op_type for n in g.node],
    }


def check_file(path: Path, kind: str) -> None:
    embed_external_data(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    assert [i.name for i in g.input] == ["input"], [i.name for i in g.input]
    assert [o.name for o in g.output] == ["logits"], [o.name for o in g.output]
    in_shape = value_shape(g.input[0])
    out_shape = value_shape(g.output[0])
    assert isinstance(in_shape[0], str) and in_shape[0], f"{path.name}: batch dim not dynamic: {in_shape}"
    assert isinstance(out_shape[0], str) and out_shape[0], f"{path.name}: batch dim not dynamic: {out_shape}"
    if path.stat().st_size > MAX_FILE_BYTES:
        raise RuntimeError(f"{path.name} is {path.stat().st_size} bytes (> 2 MB)")
    if path.name == "vgg_bn.ts.onnx":
        ops = [n.op_type for n in g.node]
        assert ops.count("BatchNormalization") == 4, ops
        assert "Identity" not in ops, ops
        for n in g.node:
            if n.op_type == "BatchNormalization":
                assert len(n.output) == 1, n
                for a in n.attribute:
                    if a.name == "training_mode":
                        assert a.i == 0, n


# --------------------------------------------------------------------------- main
def main() -> None:
    t_start = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    seed_everything(SEED)

    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}", flush=True)
    try:
        import onnxscript
        onnxscript_version = onnxscript.__version__
    except Exception:  # pragma: no cover
        onnxscript_version = None

    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")

    # ---- calibration / test data
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    calib_idx = calibration_indices(N_CALIB, CALIB_SEED)
    test_idx = heldout_test_indices(N_TEST_SUBSET, TEST_SEED)
    calib = np.ascontiguousarray(x_train[calib_idx], dtype=np.float32)
    np.savez_compressed(DATA_DIR / "fmnist_calib.npz", input=calib)
    np.savez_compressed(DATA_DIR / "fmnist_calib_flat.npz", input=calib.reshape(N_CALIB, 784))
    np.savez_compressed(
        DATA_DIR / "fmnist_test.npz",
        input=np.ascontiguousarray(x_test[test_idx], dtype=np.float32),
        labels=y_test[test_idx].astype(np.int64),
    )
    for f in sorted(DATA_DIR.glob("*.npz")):
        assert f.stat().st_size <= MAX_FILE_BYTES, f
        print(f"  wrote {f.relative_to(HERE)} ({f.stat().st_size} bytes)")

    specs = {
        "vgg_bn": (VGGBN, lambda a: a),
        "mlp": (MLP, lambda a: a.reshape(a.shape[0], 784)),
    }
    report: dict = {
        "generator": "models/build_reference.py",
        "versions": {
            "torch": torch.__version__,
            "onnxscript": onnxscript_version,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "training": {"seed": SEED, "epochs": EPOCHS, "batch_size": BATCH, "optimizer": "Adam",
                     "lr": LR, "train_images": int(len(x_train))},
        "normalization": {"mean": MEAN, "std": STD, "formula": "(x/255 - mean) / std"},
        "data": {
            "data/fmnist_calib.npz": {"split": "train", "n": N_CALIB, "seed": CALIB_SEED,
                                      "keys": {"input": [N_CALIB, 1, 28, 28]},
                                      "for": ["vgg_bn.ts.onnx", "vgg_bn.dynamo.onnx"]},
            "data/fmnist_calib_flat.npz": {"split": "train", "n": N_CALIB, "seed": CALIB_SEED,
                                           "keys": {"input": [N_CALIB, 784]},
                                           "for": ["mlp.ts.onnx", "mlp.dynamo.onnx"]},
            "data/fmnist_test.npz": {"split": "test", "n": N_TEST_SUBSET, "seed": TEST_SEED,
                                     "keys": {"input": [N_TEST_SUBSET, 1, 28, 28],
                                              "labels": [N_TEST_SUBSET]},
                                     "note": "flatten input to [N,784] for the mlp models"},
        },
        "models": {},
    }

    for name, (cls, prep) in specs.items():
        print(f"== {name}", flush=True)
        seed_everything(SEED)
        model = cls()
        n_torch_params = sum(p.numel() for p in model.parameters())
        train(model, prep(x_train), y_train, EPOCHS[name], SEED)
        model.eval()

        xt_full = prep(x_test)
        torch_logits = torch_predict(model, xt_full)
        torch_acc = float((torch_logits.argmax(1) == y_test).mean())
        print(f"  torch test acc {torch_acc:.4f}", flush=True)

        example = torch.from_numpy(prep(x_test[:2]).copy())
        for kind, exporter in (("ts", export_torchscript), ("dynamo", export_dynamo)):
            path = HERE / f"{name}.{kind}.onnx"
            t0 = time.time()
            exporter(model, example, path)
            check_file(path, kind)
            ort_logits = ort_predict(path, xt_full)
            diff = float(np.abs(ort_logits - torch_logits).max())
            acc = float((ort_logits.argmax(1) == y_test).mean())
            sub_acc = float((ort_logits[test_idx].argmax(1) == y_test[test_idx]).mean())
            # dynamic batch sanity: odd batch sizes give the same logits
            for bs in (1, 7):
                d = float(np.abs(ort_predict(path, xt_full[:bs]) - torch_logits[:bs]).max())
                assert d < 1e-3, (path.name, bs, d)
            assert diff < 1e-3, (path.name, diff)
            info = describe(path)
            info.update({
                "model": name,
                "exporter": "torchscript" if kind == "ts" else "torch.export (dynamo)",
                "export_kwargs": (
                    {"dynamo": False, "opset_version": TS_OPSET, "dynamic_axes": "batch",
                     "training": "PRESERVE", "do_constant_folding": False}
                    if kind == "ts" else
                    {"dynamo": True, "opset_version": DYNAMO_OPSET,
                     "dynamic_shapes": "torch.export.Dim('batch')"}
                ),
                "test_accuracy_ort": acc,
                "test_accuracy_torch": torch_acc,
                "test_images": int(len(y_test)),
                "test_subset_accuracy_ort": sub_acc,
                "test_subset": "data/fmnist_test.npz",
                "max_abs_diff_vs_torch": diff,
                "torch_param_count": int(n_torch_params),
                "calibration_data": "data/fmnist_calib.npz" if name == "vgg_bn" else "data/fmnist_calib_flat.npz",
            })
            report["models"][path.name] = info
            print(f"  {path.name}: {info['bytes']} bytes, acc {acc:.4f}, max|diff| {diff:.2e}, "
                  f"ops {info['op_counts']} ({time.time() - t0:.1f}s)", flush=True)

    # the .npz key must match every graph input name
    for fname, info in report["models"].items():
        assert [i["name"] for i in info["inputs"]] == ["input"], fname

    with open(HERE / "reference.json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"wrote models/reference.json; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
