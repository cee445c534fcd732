"""Correctness oracle: plant exact copies of units, prune, and check that nothing changed.

In every prunable space one unit's producer-side parameters (each constant the space slices,
i.e. everything but its consumers' weights) are overwritten with another unit's, so the two
units carry the same activation everywhere. Pruning with a near-zero tolerance must then
remove the copies (they explain nothing new) and recover them exactly: the pruned model's
outputs must equal the planted model's on held-out samples. A copy that is not removed, or an
output that changes, points at an analysis or rewrite bug (a missed coupling, a wrong fold).

    python tools/plant_oracle.py models/zoo/resnet18s.ts.onnx models/zoo/unets.ts.onnx
    python tools/plant_oracle.py /tmp/hfzoo/*.onnx --json out.jsonl   # <name>.calib.npz beside each

The calibration file is `<name>.calib.npz` beside the model (the zoo builders' convention),
else `--calib`. Prints one line per model: planted spaces, copies removed, the largest
relative L2 change of an output on held-out samples and on calibration samples, and PASS, FAIL
(a change on the calibration samples above `--atol-rel`, default 1e-3, 3e-3 for a model written
back with float16 weights: a mis-prune; on held-out
samples units that were dead in calibration may wake) or MISS (outputs exact, but a space kept
both copies: its ranking missed them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from onnxprune.graph import GraphIndex  # noqa: E402
from onnxprune.preparation import prepare  # noqa: E402
from onnxprune.rewrite import ConstantEdits  # noqa: E402
from onnxprune.spaces import Space  # noqa: E402
from onnxprune.tensors import in_memory  # noqa: E402

FP16_ATOL = 3e-3  # weights written back as float16 round the folds


def unit_groups(space: Space, spaces: list[Space]) -> np.ndarray:
    """A group label per unit: copies are planted within a group (grouped-query heads read one KV head)."""
    labels = np.zeros(space.n, dtype=np.int64)
    for other in spaces:
        derived = other.derived
        if derived is None or derived.output not in space.tensors:
            continue
        units, positions = space.tensors[derived.output].unit_positions()
        picks = np.asarray(derived.picks)
        labels[units] = picks[positions]
    return labels


def choose_pair(space: Space, spaces: list[Space]) -> tuple[int, int] | None:
    """(source, copy): two free units of one group that sit on the same tensors of the space as
    often (a Concat's or Split's parts hold different units, and a copy is only exact where its
    source is too), the copy as far from the source as possible."""
    free = [u for u in range(space.n) if u not in space.locked]
    groups = unit_groups(space, spaces)
    members: dict[tuple, list[int]] = {}
    for unit in free:
        on = tuple(len(placement.positions_of(np.array([unit]))) for _, placement in sorted(space.tensors.items()))
        members.setdefault((int(groups[unit]), on), []).append(unit)
    return next(((units[0], units[-1]) for units in members.values() if len(units) >= 2), None)


def plant(model: onnx.ModelProto, spaces: list[Space], prunable: list[Space]) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Copy a source unit's producer-side constants onto another unit in every prunable space,
    in place, through the rewrite's own constant edits (node labels as the analysis gave them).

    Returns the planted pairs by space name and the spaces that could not be planted (why)."""
    index = GraphIndex(model, shapes={})
    source = list(model.graph.initializer)
    del model.graph.initializer[:]  # ConstantEdits.commit writes them back, edited ones replaced
    edits = ConstantEdits(model, index, source)
    planted: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for space in prunable:
        pair = choose_pair(space, spaces)
        if pair is None:
            skipped[space.name] = "fewer than two free units in a group"
            continue
        copies = _copied_values(space, pair, edits)
        if isinstance(copies, str):
            skipped[space.name] = copies
            continue
        for (label, slot), value in copies.items():
            edits.set(label, slot, value)
        planted[space.name] = pair
    edits.commit()
    return planted, skipped


def _copied_values(space: Space, pair: tuple[int, int], edits: ConstantEdits) -> dict[tuple[str, int], np.ndarray] | str:
    """The space's sliced constants with the copy's entries overwritten by the source's (by node
    label and input slot), or why they cannot be."""
    source, copy = pair
    values: dict[tuple[str, int], np.ndarray] = {}
    for record in dict.fromkeys(space.slices):
        key = (record.node, record.input_index)
        if key not in values:
            stored = edits.get(*key) if edits.has(*key) else None
            if stored is None:
                return f"{record.node} input {record.input_index} is not a constant"
            values[key] = np.array(stored)
        placement, value = space.tensors[record.tensor], values[key]
        src, dst = (placement.element_positions_of(np.array([unit])) for unit in pair)
        if not len(src):
            continue
        block = value.shape[record.axis] // record.repeats
        if block != placement.size:
            return f"{record.node} input {record.input_index}: axis {record.axis} holds {block} per block, the tensor {placement.size}"
        for k in range(record.repeats):
            target = [slice(None)] * value.ndim
            target[record.axis] = dst + k * block
            value[tuple(target)] = np.take(value, src + k * block, axis=record.axis)
    return values


def run_model(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def relative_change(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(before, after, strict=True):
        if not np.issubdtype(a.dtype, np.floating):
            worst = max(worst, float(not np.array_equal(a, b)))
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        worst = max(worst, float(np.linalg.norm(a64 - b64) / (np.linalg.norm(a64) + 1e-30)))
    return worst


def check(model_path: Path, calib_path: Path, tolerance: float, sequential: bool | str, held_out: int) -> dict:
    """Plant, prune and compare one model; returns a result row.

    The run holds out copies of its first calibration rows, so the report's fidelity (which
    feeds and compares shrunk KV caches too) is the change on rows the fit saw; the data's own
    last rows, which the run never reads, give the change on new data (models whose inputs
    keep their shapes)."""
    data = dict(np.load(calib_path))
    n = next(iter(data.values())).shape[0]
    fresh = {k: v[n - held_out:] for k, v in data.items()}
    run_data = {k: np.concatenate([v[:n - held_out], v[:held_out]]) for k, v in data.items()}
    prepared = prepare(str(model_path), run_data, verify_samples=held_out)
    planted_model = onnx.ModelProto()
    planted_model.CopyFrom(prepared.original)
    for tensor in planted_model.graph.initializer:  # the pipeline's copy keeps large weights on disk
        tensor.CopyFrom(in_memory(tensor))
    planted, skipped = plant(planted_model, prepared.analysis.spaces, prepared.analysis.prunable)
    with tempfile.TemporaryDirectory() as folder:
        planted_path = str(Path(folder) / "planted.onnx")
        onnx.save(planted_model, planted_path)
        result = onnxprune.prune(planted_path, run_data, tolerance=tolerance, allocation="global", sequential=sequential,
                                 verify_samples=held_out)
        change = None
        if not result.report.io_changes:
            pruned_path = str(Path(folder) / "pruned.onnx")
            onnx.save(result.model, pruned_path)
            change = relative_change(run_model(planted_path, fresh), run_model(pruned_path, fresh))
    rows = {row.name: row for row in result.report.spaces}
    removed = {name: rows[name].units - rows[name].kept for name in planted if name in rows}
    for name in planted:  # pinned once calibrated (a site with fewer rows than units): not planted after all
        if name in rows and rows[name].pinned:
            skipped[name] = rows[name].pinned[0]
            removed.pop(name, None)
    missed = sorted(name for name, count in removed.items() if count < 1)
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)
    return {"model": model_path.name, "planted": len(removed), "skipped": skipped, "missed": missed,
            "units_removed": sum(removed.values()), "change": change,
            "change_calibration": max(f.relative_l2 for f in result.report.fidelity), "fp16": fp16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--calib", type=Path, default=None, help="calibration .npz (default: <name>.calib.npz beside the model)")
    parser.add_argument("--tolerance", type=float, default=1e-7, help="largest normalised energy of a removed unit")
    parser.add_argument("--sequential", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--atol-rel", type=float, default=1e-3)
    parser.add_argument("--json", type=Path, default=None, help="append one JSON line per model")
    args = parser.parse_args()
    sequential = {"auto": "auto", "on": True, "off": False}[args.sequential]
    failures = 0
    for path in args.models:
        calib = args.calib or path.with_name(path.name.split(".")[0] + ".calib.npz")
        try:
            row = check(path, calib, args.tolerance, sequential, args.held_out)
            atol = max(args.atol_rel, FP16_ATOL) if row["fp16"] else args.atol_rel
            row["verdict"] = "FAIL" if row["change_calibration"] > atol else "MISS" if row["missed"] else "PASS"
        except Exception as error:  # noqa: BLE001 - one line per model, the sweep goes on
            row = {"model": path.name, "verdict": "ERROR", "error": f"{type(error).__name__}: {error}"}
        failures += row["verdict"] in ("FAIL", "ERROR")
        if row["verdict"] == "ERROR":
            print(f"{row['model']}: ERROR {row['error']}", flush=True)
        else:
            print(f"{row['model']}: {row['verdict']} planted {row['planted']} (skipped {len(row['skipped'])}), "
                  f"removed {row['units_removed']}, missed {len(row['missed'])}, largest relative change on calibration rows "
                  f"{row['change_calibration']:.2e}, new rows " + ("n/a" if row["change"] is None else f"{row['change']:.2e}"), flush=True)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(row) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
