"""The reference zoo at a glance (issue 3): per model and exporter, prunable and pinned spaces
(with reasons), MACs removed at --ratio 0.3 and output fidelity on held-out samples.

    python tools/zoo_table.py [--ratio 0.3]
    python models/build_zoo_hf.py && python tools/zoo_table.py --folder /tmp/hfzoo

`--folder` reads every `<name>.<exporter>.onnx` there with its `<name>.calib.npz` (the tiny
Hugging Face architectures of models/build_zoo_hf.py); a model that fails gets an error row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402

ZOO = ROOT / "models" / "zoo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--folder", type=Path, default=None, help="models with <name>.calib.npz beside them (default: models/zoo)")
    args = parser.parse_args()
    folder = args.folder or ZOO
    files = json.loads((ZOO / "manifest.json").read_text())["files"] if args.folder is None else {}
    print("| model | exporter | prunable spaces | pinned spaces (reasons) | MACs removed | rel. L2 error | cosine |")
    print("|---|---|---:|---|---:|---:|---:|")
    for path in sorted(folder.glob("*.onnx")):
        stem, exporter = path.name.split(".")[:2]
        calib = ZOO / files[path.name]["calib"] if files else folder / f"{stem}.calib.npz"  # NHWC Keras models: calib_nhwc.npz
        try:
            _, report = onnxprune.prune(path, calib, ratio=args.ratio)
        except onnxprune.OnnxPruneError as error:
            print(f"| {stem} | {exporter} | error: {error} |  |  |  |  |")
            continue
        pinned = [s for s in report.spaces if s.pinned]
        reasons = Counter(s.pinned[0].split(" '")[0] if "graph output" not in s.pinned[0] else "graph output" for s in pinned)
        reason_text = ", ".join(f"{n}x {r}" for r, n in reasons.items())
        fidelity = report.fidelity[0]
        print(f"| {stem} | {exporter} | {len(report.spaces) - len(pinned)} | {len(pinned)} ({reason_text}) | "
              f"{1 - report.macs_after / report.macs_before:.1%} | {fidelity.relative_l2:.3g} | {fidelity.cosine:.4f} |")


if __name__ == "__main__":
    main()
