"""TorchScript against torch.export EfficientNet-Lite0 (issue 14, item 3): prunable spaces and
units of both exports (models/build_imagenet.py writes them to ~/.cache/onnxprune/imagenet/),
and with --prune the MACs removed and the output fidelity at --ratio on the cached calibration
crops. The TorchScript export computes its TF-"same" pads from shapes and flattens with
view(x.size(0), -1); both must prune like the torch.export twin.

    python tools/effnet_ts_spaces.py [--prune] [--ratio 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402

FOLDER = Path("~/.cache/onnxprune/imagenet").expanduser()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prune", action="store_true")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()
    for exporter in ("ts", "dynamo"):
        path = FOLDER / f"efficientnet_lite0.{exporter}.onnx"
        report = onnxprune.inspect_model(str(path))
        prunable = [s for s in report.spaces if not s.pinned]
        pinned = [s for s in report.spaces if s.pinned]
        line = (f"{exporter:7s} prunable spaces {len(prunable)} ({sum(s.units for s in prunable)} units), "
                f"pinned {len(pinned)}: {'; '.join(s.pinned[0] for s in pinned)}")
        if args.prune:
            _, result = onnxprune.prune(path, FOLDER / "efficientnet_lite0.calib.npz", ratio=args.ratio)
            fidelity = result.fidelity[0]
            line += (f" | --ratio {args.ratio}: {1 - result.macs_after / result.macs_before:.1%} MACs removed, "
                     f"rel. L2 {fidelity.relative_l2:.3g}, cosine {fidelity.cosine:.4f}")
        print(line)


if __name__ == "__main__":
    main()
