"""How much of a SwiGLU FFN's removed neurons a linear recovery can carry (issue 13).

For a few layers of an exported Llama-style decoder (SmolLM2 by default), the FFN input x and
the down_proj input h = silu(gate x) * (up x) are captured with onnxruntime on calibration
windows. A fraction of the neurons is removed (those with the smallest output energy
E||W_j h_j||^2) and their contribution h_P W_P is predicted on held-out tokens by least squares
from [1], [1, h_K] (onnxprune's recovery) and [1, h_K, x] (a linear bypass from the FFN input).
Printed: the held-out relative error of each prediction of the removed part and of the
layer's output (1.0 = the prediction carries nothing).

    python tools/probe_ffn_recovery.py [--model PATH --calib NPZ] [--layers 3 10 15 22 28]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

FOLDER = Path.home() / ".cache/onnxprune/models/smollm2"


def ffn_taps(model: onnx.ModelProto, hidden: int, ffn: int, base_dir: str = "") -> list[tuple[str, str, np.ndarray]]:
    """Per layer, in node order: (FFN input, down_proj input, down_proj weight [ffn, hidden])."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    taps = []
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is None or tuple(weight.dims) != (ffn, hidden):
            continue
        gated = producer[node.input[0]]  # silu(gate) * up
        up = next(producer[t] for t in gated.input if producer[t].op_type == "MatMul")
        taps.append((up.input[0], node.input[0], numpy_helper.to_array(weight, base_dir=base_dir)))
    return taps


def capture(path: Path, names: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The named tensors on every window, tokens stacked (rows)."""
    model = onnx.load(str(path), load_external_data=False)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    # saved beside the model, so that its external data resolves; removed after loading
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".onnx") as tapped:
        onnx.save(model, tapped.name)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(tapped.name, options, providers=["CPUExecutionProvider"])
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for window in ids:
        feed = {"input_ids": window[None], "attention_mask": np.ones_like(window[None])}
        for name, value in zip(names, session.run(names, feed), strict=True):
            parts[name].append(value.reshape(-1, value.shape[-1]))
    return {n: np.concatenate(v).astype(np.float64) for n, v in parts.items()}


def held_out_errors(x: np.ndarray, h: np.ndarray, weight: np.ndarray, remove: float) -> dict[str, tuple[float, float]]:
    """Held-out relative error of the removed part (and of the layer's output) per predictor."""
    rows = len(x)
    train, test = slice(0, rows * 3 // 4), slice(rows * 3 // 4, rows)
    energy = (h[train] ** 2).mean(0) * (weight ** 2).sum(1)
    order = np.argsort(-energy)
    kept = np.sort(order[: int(round(len(order) * (1 - remove)))])
    removed_part = h[:, np.setdiff1d(order, kept)] @ weight[np.setdiff1d(order, kept)]
    output = h @ weight
    ones = np.ones((rows, 1))
    found = {}
    for name, a in (("mean only", ones), ("kept neurons (onnxprune)", np.hstack([ones, h[:, kept]])),
                    ("kept neurons + FFN input", np.hstack([ones, h[:, kept], x]))):
        gram = a[train].T @ a[train]
        gram += 1e-8 * np.trace(gram) / len(gram) * np.eye(len(gram))
        residual = removed_part[test] - a[test] @ np.linalg.solve(gram, a[train].T @ removed_part[train])
        found[name] = (float(np.linalg.norm(residual) / np.linalg.norm(removed_part[test])),
                       float(np.linalg.norm(residual) / np.linalg.norm(output[test])))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=FOLDER / "smollm2.dynamo.onnx")
    parser.add_argument("--calib", type=Path, default=FOLDER / "smollm2_calib.npz")
    parser.add_argument("--windows", type=int, default=28)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 10, 15, 22, 28])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--remove", type=float, default=0.27, help="fraction of each layer's neurons removed")
    args = parser.parse_args()
    taps = ffn_taps(onnx.load(str(args.model), load_external_data=False), args.hidden, args.ffn, str(args.model.parent))
    chosen = [taps[i] for i in args.layers]
    values = capture(args.model, [t for x, h, _ in chosen for t in (x, h)], np.load(args.calib)["input_ids"][: args.windows])
    print("| layer | predictor | removed part, held-out rel. error | layer output, held-out rel. error |\n|---:|---|---:|---:|")
    for layer, (x, h, weight) in zip(args.layers, chosen, strict=True):
        for name, (part, whole) in held_out_errors(values[x], values[h], weight.astype(np.float64), args.remove).items():
            print(f"| {layer} | {name} | {part:.3f} | {whole:.4f} |", flush=True)


if __name__ == "__main__":
    main()
