"""Ablation for coupled spaces (issue 3): how to combine the sites of a space that several
consumers read (residual streams) into one ranking. Prints top-1 accuracy on the Fashion-MNIST
test split of the trained ResNet at several MACs targets, for each site weighting.

    python tools/ablate_coupled.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
import onnxprune.score  # noqa: E402

MODEL = ROOT / "models" / "resnet_fmnist.ts.onnx"
CALIB = ROOT / "models" / "data" / "fmnist_calib.npz"
TEST = np.load(ROOT / "models" / "data" / "fmnist_test.npz")


def accuracy(model) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": TEST["input"]})[0]
    return float(np.mean(logits.argmax(1) == TEST["labels"]))


def main() -> None:
    import onnx

    print(f"unpruned: {accuracy(onnx.load(MODEL)):.3f}")
    print("| site weighting | order | " + " | ".join(f"{t:.0%} MACs removed" for t in (0.3, 0.5, 0.7)) + " |")
    print("|---|---|" + "---:|" * 3)
    for weighting in ("covariance", "normalised"):
        onnxprune.score.SITE_WEIGHTING = weighting
        for order in ("pivoted", "weighted"):
            cells = []
            for target in (0.3, 0.5, 0.7):
                try:
                    model, _ = onnxprune.prune(MODEL, CALIB, flops=target, order=order)
                    cells.append(f"{accuracy(model):.3f}")
                except onnxprune.TargetError:
                    cells.append("n/a")
            print(f"| {weighting} | {order} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
