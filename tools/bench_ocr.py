"""OCR benchmark: a CRNN (conv front end, two bidirectional LSTMs, CTC) trained on lines of four
real MNIST digits (`models/train_crnn_digits.py`), pruned at 30/50/60% of its MACs without
fine-tuning. Metrics on 1000 test lines whose digit images the calibration never saw: sequence
accuracy (the whole line read right), character accuracy (1 - CER) and agreement with the
unpruned model's decoded lines.

Rows: onnxprune's defaults (snp, sequential recovery for a model without attention heads),
`--one-shot`, the baselines (lsq, fluct, l2, l1), `LSTM hidden units pinned` (the LSTMs
excluded: what every version before their hidden units became prunable did) and `recurrent
inputs pinned` (also the units that feed an LSTM excluded: before LSTM/GRU/RNN inputs became
consumers). The recurrent ops' MACs count in the target (steps x batch x directions x gates x
hidden x (input + hidden)).

    python models/train_crnn_digits.py      # once (the model and data are committed)
    python tools/bench_ocr.py [--targets 30 50 60] [--out DIR]
    python tools/bench_ocr.py --latency --targets 30 50   # pruned / original onnxruntime latency
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from bench_speed import latency  # noqa: E402
from ocr_eval import greedy_decode, make_session, run_logits, score_sequences  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune.api import prepare  # noqa: E402
from onnxprune.ops import RECURRENT_GATES  # noqa: E402

MODEL = ROOT / "models" / "crnn_digits.ts.onnx"
DATA = ROOT / "models" / "data"
# (label, method, prune keywords); "pinned": "hidden" excludes the recurrent ops (their hidden
# units), "inputs" also the producers whose units feed them
VARIANTS = (
    ("snp (defaults: sequential)", "snp", {}),
    ("snp, --no-rechoose", "snp", {"sequential": True, "rechoose": False}),
    ("snp, --judge one-shot", "snp", {"judge": "one-shot"}),
    ("snp, --one-shot", "snp", {"sequential": False}),
    ("snp, LSTM hidden units pinned", "snp", {"pinned": "hidden"}),
    ("snp, --one-shot, LSTM hidden units pinned", "snp", {"sequential": False, "pinned": "hidden"}),
    ("snp, --one-shot, recurrent inputs pinned", "snp", {"sequential": False, "pinned": "inputs"}),
    ("snp, recurrent inputs pinned", "snp", {"pinned": "inputs"}),
    ("lsq (one-shot)", "lsq", {"sequential": False}),
    ("fluct (FLAP)", "fluct", {"sequential": False}),
    ("l2", "l2", {}),
    ("l1", "l1", {}),
)


def recurrent_producers(calib: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """The LSTM/GRU/RNN nodes ("hidden") and, with them, the producers of the spaces they read ("inputs")."""
    analysis = prepare(MODEL, calib, verify_samples=4).analysis
    ops = sorted({p for s in analysis.prunable for p in s.producers if s.recurrent_reads})
    feeders = sorted({p for s in analysis.prunable if any(c.op_type in RECURRENT_GATES for c in s.consumers) for p in s.producers})
    return {"hidden": ops, "inputs": sorted(set(ops) | set(feeders))}


def evaluate(model, x: np.ndarray, labels: np.ndarray, reference: list[tuple[int, ...]]) -> dict[str, float]:
    decoded = greedy_decode(run_logits(model, x))
    scores = score_sequences(decoded, [tuple(int(c) for c in r) for r in labels])
    scores["agreement"] = float(np.mean([d == r for d, r in zip(decoded, reference, strict=True)]))
    return scores


def latency_rows(calib: dict[str, np.ndarray], x: np.ndarray, targets: list[float]) -> list[dict]:
    """Pruned / original onnxruntime CPU latency (2 threads, batch 1 and 32; the better of two
    rounds of timed runs each, interleaved) for the default prune at each target and round-to."""
    original = make_session(MODEL)
    rows = []
    for target in targets:
        for round_to in (8, 1):
            model, report = onnxprune.prune(MODEL, calib, flops=target / 100, round_to=round_to)
            pruned = make_session(model)
            row = {"target": target, "round_to": round_to, "macs_ratio": round(report.macs_after / report.macs_before, 3)}
            for batch, runs in ((1, 200), (32, 40)):
                feed = np.ascontiguousarray(x[:batch])
                times = [(latency(original, "input", feed, runs), latency(pruned, "input", feed, runs)) for _ in range(2)]
                row[f"latency_ratio_b{batch}"] = round(min(p for _, p in times) / min(o for o, _ in times), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CRNN OCR pruning benchmark (see the module docstring)")
    parser.add_argument("--targets", nargs="+", type=float, default=[30, 50, 60], help="MACs removed, percent")
    parser.add_argument("--variants", nargs="+", default=None, choices=[v[0] for v in VARIANTS], metavar="VARIANT")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ocr")
    parser.add_argument("--latency", action="store_true", help="only time the default prune at each target (round-to 8 and 1) against the original")
    args = parser.parse_args(argv)
    with np.load(DATA / "crnn_calib.npz") as f:
        calib = {"input": f["input"]}
    with np.load(DATA / "crnn_test.npz") as f:
        x, labels = f["input"], f["labels"]
    if args.latency:
        rows = latency_rows(calib, x, args.targets)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latency.json").write_text(json.dumps(rows, indent=1))
        return 0
    reference = greedy_decode(run_logits(MODEL, x))
    rows = [{"variant": "unpruned", "target": 0.0, **evaluate(MODEL, x, labels, reference)}]
    print(json.dumps(rows[0]), flush=True)
    pinned = recurrent_producers(calib)
    print(f"recurrent ops and the producers feeding them: {pinned}", flush=True)
    for label, method, options in VARIANTS:
        if args.variants and label not in args.variants:
            continue
        options = dict(options)
        exclude = pinned.get(options.pop("pinned", ""), [])
        for target in args.targets:
            start = time.perf_counter()
            model, report = onnxprune.prune(MODEL, calib, flops=target / 100, method=method, exclude=exclude, **options)
            row = {"variant": label, "target": target, "macs_removed": round(1 - report.macs_after / report.macs_before, 4),
                   "seconds": round(time.perf_counter() - start, 1), **evaluate(model, x, labels, reference)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| variant | " + " | ".join(f"{t:g}% MACs: seq. acc / char acc / agreement" for t in args.targets) + " |",
             "|---|" + "---:|" * len(args.targets)]
    base = rows[0]
    lines.append(f"| unpruned | {100 * base['sequence_accuracy']:.1f} / {100 * base['char_accuracy']:.1f} / 100 |" + " |" * (len(args.targets) - 1))
    for label in dict.fromkeys(r["variant"] for r in rows[1:]):
        cells = []
        for t in args.targets:
            r = next((r for r in rows if r["variant"] == label and r["target"] == t), None)
            cells.append("" if r is None else f"{100 * r['sequence_accuracy']:.1f} / {100 * r['char_accuracy']:.1f} / {100 * r['agreement']:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (args.out / "results.md").write_text(f"Command: `python tools/bench_ocr.py {' '.join(argv or sys.argv[1:])}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
