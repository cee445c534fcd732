"""Speed and memory benchmark (issue 6). Prints ratios measured in one run, never bare times:

1. tool time: a whole onnxprune run / one plain onnxruntime pass over the same calibration set,
   at n and 4n samples, and the marginal ratio (the per-sample cost without fixed costs);
2. memory: peak RSS of a pruning run at 256 / 1024 / 4096 samples (flat in the sample count),
   and of pruning SmolLM2-135M when it is installed (models/export_smollm2.py);
3. pruned-model speed: onnxruntime CPU latency of pruned / original at 30/50/70% MACs removed,
   batch 1 and 32, for --round-to 1 / 8 / 16, next to the MACs ratio; 3b: `--latency` targets;
4. scale: seconds per layer of the float64 linear algebra for wide layers (n = 4096..16384);
5. out of core (issue 15): peak RSS of a CLI run calibrating a small 224x224 CNN from a synthetic
   .npy of growing size (up to 20,000 x 3 x 224 x 224 float32, 12 GB, written to --scratch), a
   stored .npz, the same data in memory for contrast, and SmolLM2-135M from a .npz at 32 and 128
   windows: flat in the calibration set's size.

    python tools/bench_speed.py                              # everything (~25 minutes on 2 cores)
    python tools/bench_speed.py --quick                      # a smoke run
    python tools/bench_speed.py --sections latency_target    # one section, the rest kept from results.json
Results also go to results/speed/results.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxprune  # noqa: E402
from onnxprune.recovery import fit_recovery  # noqa: E402
from onnxprune.score import block_pivoted_order, cholesky_energy, pivoted_order  # noqa: E402
from onnxprune.stats import SiteStats  # noqa: E402

IMAGENET = Path.home() / ".cache" / "onnxprune" / "imagenet"  # python models/build_imagenet.py
MODELS = {
    "vgg_bn": (ROOT / "models/vgg_bn.ts.onnx", (1, 28, 28)),
    "resnet18s": (ROOT / "models/zoo/resnet18s.ts.onnx", (3, 32, 32)),
    "mobilenetv2s": (ROOT / "models/zoo/mobilenetv2s.ts.onnx", (3, 32, 32)),
    "resnet_fmnist": (ROOT / "models/resnet_fmnist.ts.onnx", (1, 28, 28)),
    "mobilenet_v2": (IMAGENET / "mobilenet_v2.ts.onnx", (3, 224, 224)),
    "efficientnet_lite0": (IMAGENET / "efficientnet_lite0.dynamo.onnx", (3, 224, 224)),  # the TorchScript export's computed Pads pin most spaces
}


def sample_count(shape: tuple[int, ...], wanted: int) -> int:
    """Fewer samples for ImageNet-sized inputs (memory), the same statistics per pixel row."""
    return wanted if int(np.prod(shape)) < 10_000 else max(64, wanted // 8)
THREADS = 2
SECTIONS = ("tool_time", "memory", "speed", "latency_target", "scale", "out_of_core", "sequential")


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def input_name(path: Path) -> str:
    return onnx.load(path, load_external_data=False).graph.input[0].name


def samples(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# -- 1. tool time -------------------------------------------------------------------------------
def tool_time(name: str, path: Path, shape, n: int, batch: int) -> dict:
    """A whole default prune() run (with its verification) over n and 4n samples, against one
    onnxruntime pass over the same samples; the marginal ratio is the per-sample cost without the
    fixed costs (loading, session start, scoring, rewriting)."""
    key = input_name(path)
    sess = session(path)
    row = {"model": name, "batch": batch}
    for label, count in (("", n), ("_4x", 4 * n)):
        x = samples(shape, count)
        sess.run(None, {key: x[:batch]})  # warm
        start = time.perf_counter()
        for i in range(0, count, batch):
            sess.run(None, {key: x[i:i + batch]})
        forward = time.perf_counter() - start
        start = time.perf_counter()
        _, report = onnxprune.prune(path, {key: x}, flops=0.5, batch_size=batch, round_to=8)
        total = time.perf_counter() - start
        row[f"samples{label}"] = count
        row[f"forward{label}"], row[f"tool{label}"] = forward, total
        row[f"tool_over_forward{label}"] = round(total / forward, 2)
        row[f"calibrate_over_forward{label}"] = round(report.seconds["calibrate"] / forward, 2)
        row[f"stages_over_forward{label}"] = {k: round(v / forward, 2) for k, v in report.seconds.items()}
        row["subsampled_sites"] = f"{len(report.spatial_strides)}/{len(report.spatial_strides) + sum(1 for s in report.spaces if not s.pinned)}"
    row["marginal_over_forward"] = round((row["tool_4x"] - row["tool"]) / (row["forward_4x"] - row["forward"]), 2)
    for k in ("forward", "tool", "forward_4x", "tool_4x"):  # ratios only in the results
        row.pop(k)
    return row


# -- 2. memory ----------------------------------------------------------------------------------
MEMORY_CHILD = """
import sys, numpy as np, onnxruntime as ort, onnxprune
path, n, shape, key, mode = sys.argv[1], int(sys.argv[2]), tuple(map(int, sys.argv[3].split(','))), sys.argv[4], sys.argv[5]
x = np.random.default_rng(0).standard_normal(size=(n, *shape), dtype=np.float32)
def status_kb(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = status_kb('VmRSS')
if mode == 'floor':  # what any onnxruntime user pays: one session and one batch
    ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {key: x[:32]})
else:
    onnxprune.prune(path, {key: x}, flops=0.3, batch_size=32, verify_samples=16)
print(base, status_kb('VmHWM'), x.nbytes // 1024)
"""


def memory(name: str, path: Path, shape, counts: list[int]) -> dict:
    key = input_name(path)
    model_kb = path.stat().st_size // 1024
    analysis = onnxprune.api.prepare(path, {key: samples(shape, 40)}, verify_samples=4).analysis
    gram_kb = sum(8 * s.width ** 2 for s in analysis.sites()) // 1024
    def growth(n: int, mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), str(n), ",".join(map(str, shape)), key, mode],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
        base, peak, _ = map(int, out)
        return peak - base

    floor = growth(256, "floor")
    # RSS growth of a run over the process with its data loaded, less what one plain onnxruntime
    # session costs, against the budget 3 x model size + sum over sites of n^2 x 8 bytes
    rows = [{"samples": n, "rss_growth_mb": round((growth(n, "prune") - floor) / 1024, 1)} for n in counts]
    budget = 3 * model_kb + gram_kb
    return {"model": name, "budget_mb": round(budget / 1024, 1), "session_floor_mb": round(floor / 1024, 1), "runs": rows,
            "within_budget": all(r["rss_growth_mb"] * 1024 <= budget for r in rows)}


LLM_CHILD = """
import contextlib, sys, numpy as np, onnxprune, onnxprune.api as api
path, calib, windows = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = {k: v[:windows] for k, v in np.load(calib).items()}
def status_kb(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
def reset_peak():
    open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
peaks = {}
timed = api._stage
@contextlib.contextmanager
def traced(seconds, name):  # the exact peak RSS of every pipeline stage
    peaks['between stages'] = max(peaks.get('between stages', 0), status_kb('VmHWM'))
    reset_peak()
    with timed(seconds, name):
        yield
    peaks[name] = max(peaks.get(name, 0), status_kb('VmHWM'))  # a stage that runs twice (plan) keeps its highest peak
    reset_peak()
api._stage = traced
reset_peak()
base = status_kb('VmRSS')
_, report = onnxprune.prune(path, data, ratio=0.2, batch_size=4, verify_samples=4)
peaks['between stages'] = max(peaks.get('between stages', 0), status_kb('VmHWM'))
del _
print(' '.join(f'{k.replace(" ", "_")}={(v - base) // 1024}' for k, v in peaks.items()))
print(base, max(peaks.values()), sum(s.width ** 2 * 8 for s in onnxprune.api.prepare(path, data, verify_samples=4).analysis.sites()))
"""
SMOLLM2 = Path.home() / ".cache" / "onnxprune" / "models" / "smollm2"  # python models/export_smollm2.py
LLM_WINDOWS = (16, 32, 64)  # calibration windows: the peak must not grow with them


def llm_memory(windows: int = 32) -> dict | None:
    """Peak RSS growth of pruning SmolLM2-135M (538 MB of weights, 512-token windows, batch 4)."""
    path, calib = SMOLLM2 / "smollm2.dynamo.onnx", SMOLLM2 / "smollm2_calib.npz"
    if not path.exists():
        return None
    weights = sum(f.stat().st_size for f in SMOLLM2.glob("smollm2.dynamo.onnx*"))
    out = subprocess.run([sys.executable, "-c", LLM_CHILD, str(path), str(calib), str(windows)], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    base, peak, gram = map(int, out[-3:])
    budget = 3 * weights + gram
    stages = {k: int(v) for k, v in (item.split("=") for item in out[:-3])}
    return {"model": "smollm2", "samples": windows, "model_mb": round(weights / 2**20), "budget_mb": round(budget / 2**20),
            "peak_growth_mb": round((peak - base) / 1024), "within_budget": (peak - base) * 1024 <= budget, "stage_peak_growth_mb": stages}


# -- 3. pruned-model latency ---------------------------------------------------------------------
def latency(sess: ort.InferenceSession, key: str, x: np.ndarray, repeats: int, budget_s: float = 1.5, min_s: float = 0.25) -> float:
    """Median latency over at least `repeats` runs and `min_s` seconds of runs (sub-millisecond
    models need thousands of runs to get past timer and scheduler noise), at most ~budget_s."""
    sess.run(None, {key: x})
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s and (len(times) < repeats or sum(times) < min_s)):
        start = time.perf_counter()
        sess.run(None, {key: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pruned_speed(name: str, path: Path, shape, targets: list[float], rounds: list[int], repeats: int) -> list[dict]:
    key = input_name(path)
    calib = {key: samples(shape, sample_count(shape, 512))}
    original = session(path)
    rows = []
    for target in targets:
        for round_to in rounds:
            try:
                model, report = onnxprune.prune(path, calib, flops=target, round_to=round_to)
            except onnxprune.TargetError as exc:
                rows.append({"model": name, "macs_removed": target, "round_to": round_to, "unreachable": str(exc)})
                continue
            pruned = session(model)
            row = {"model": name, "macs_removed": target, "round_to": round_to, "macs_ratio": round(report.macs_after / report.macs_before, 3)}
            for batch in (1, 32):
                x = samples(shape, batch, seed=1)
                base, fast = [], []
                for _ in range(5):  # interleave to cancel drift
                    base.append(latency(original, key, x, repeats))
                    fast.append(latency(pruned, key, x, repeats))
                ratio = float(np.median(fast) / np.median(base))
                row[f"latency_ratio_b{batch}"] = round(ratio, 3)
                row[f"meets_1.15x_b{batch}"] = ratio <= 1.15 * row["macs_ratio"]
            rows.append(row)
    return rows


def latency_targets(name: str, path: Path, shape, targets: list[float], repeats: int) -> list[dict]:
    """`--latency F` (the threshold searched by timing): the MACs ratio it ended at, the latency
    ratio the tool measured, and the one this benchmark measures afterwards with its own timer."""
    key = input_name(path)
    calib = {key: samples(shape, sample_count(shape, 512))}
    original = session(path)
    x = samples(shape, 1, seed=1)
    rows = []
    for target in targets:
        try:
            model, report = onnxprune.prune(path, calib, latency=target, round_to=8, latency_batch=1, latency_threads=THREADS)
        except onnxprune.TargetError as exc:
            rows.append({"model": name, "latency_removed": target, "unreachable": str(exc)})
            continue
        pruned = session(model)
        ratios = [latency(pruned, key, x, repeats) / latency(original, key, x, repeats) for _ in range(3)]
        rows.append({"model": name, "latency_removed": target, "macs_ratio": round(report.macs_after / report.macs_before, 3),
                     "tool_measured_ratio": report.latency["ratio"], "bench_measured_ratio": round(float(np.median(ratios)), 3),
                     "candidates_timed": len(report.latency["steps"])})
    return rows


# -- 4. linear algebra at scale ------------------------------------------------------------------
def wide_layers(sizes: list[int]) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        rank = n // 2  # activations of a wide layer: low-rank structure plus noise
        basis = rng.normal(size=(rank, n)) / np.sqrt(rank)
        cov = basis.T @ basis + 1e-3 * np.eye(n)
        row = {"units": n}
        start = time.perf_counter()
        order, _ = pivoted_order(cov)
        row["pivoted_cholesky_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        cholesky_energy(cov, order)
        row["ordered_cholesky_s"] = round(time.perf_counter() - start, 2)
        keep, prune = np.sort(order[: n // 2]), np.sort(order[n // 2:])
        stats = SiteStats(10 * n, np.zeros(n), cov * 10 * n)
        start = time.perf_counter()
        fit_recovery(stats, keep, prune)
        row["recovery_solve_s"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        del cov, basis
    heads = rng.normal(size=(2048, 12 * 64))
    start = time.perf_counter()
    block_pivoted_order(np.cov(heads.T), 64)
    rows.append({"units": "12 heads x 64", "block_pivoted_s": round(time.perf_counter() - start, 3)})
    return rows


# -- 5. out-of-core calibration -----------------------------------------------------------------
OOC_CHILD = """
import sys, numpy as np, onnxprune, onnxprune.cli
def status_kb(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
model, calib, mode, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
base = status_kb('VmRSS')  # after the imports
if mode == 'memory':  # the whole set read into memory first, as the loader did before issue 15
    data = np.load(calib)
    base = status_kb('VmRSS') - data.nbytes // 1024
    onnxprune.prune(model, {'x': data}, ratio=0.3, batch_size=32)
else:
    assert onnxprune.cli.main([model, '--calib', calib, '-o', calib + '.pruned.onnx', '-q', *extra]) == 0
print(base, status_kb('VmHWM'))
"""


def small_cnn_224(path: Path) -> None:
    """3x224x224 -> 4x4/4 conv 16 -> ReLU -> 3x3/2 conv 32 -> ReLU -> GAP -> Gemm 10 (about 4.5 MMAC per image)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((16, 3, 4, 4)) * 0.2, "w2": rng.standard_normal((32, 16, 3, 3)) * 0.1, "w3": rng.standard_normal((32, 10)) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"), helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"), helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "cnn224", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def synthetic_npy(path: Path, n: int, chunk: int = 500) -> None:
    """n x 3 x 224 x 224 float32 of smooth random images, written a chunk at a time."""
    rng = np.random.default_rng(1)
    with open(path, "wb") as handle:  # plain writes: a memory map would put the whole file in this process's RSS
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                                                      "shape": (n, 3, 224, 224)})
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            coarse = rng.random((count, 3, 28, 28), dtype=np.float32)
            images = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3) + 0.1 * rng.random((count, 3, 224, 224), dtype=np.float32)
            images.astype(np.float32).tofile(handle)


def ooc_peak(model: Path, calib: Path, mode: str = "file", extra: tuple[str, ...] = ()) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", OOC_CHILD, str(model), str(calib), mode, *extra], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    base, peak = map(int, out[-2:])
    for leftover in calib.parent.glob(calib.name + ".pruned.onnx*"):
        leftover.unlink()
    return {"peak_rss_mb": round(peak / 1024), "growth_mb": round((peak - base) / 1024), "seconds": round(time.perf_counter() - start)}


def out_of_core(scratch: Path, counts: list[int], npz_count: int | None, memory_count: int | None, llm_windows: list[int]) -> list[dict]:
    """Peak RSS of a CLI run against the calibration set's size (the files are removed afterwards)."""
    scratch.mkdir(parents=True, exist_ok=True)
    model = scratch / "cnn224.onnx"
    small_cnn_224(model)
    rows = []
    for n in counts:
        path = scratch / f"calib_{n}.npy"
        synthetic_npy(path, n)
        args = ("--ratio", "0.3", "--batch-size", "32")
        rows.append({"source": ".npy", "samples": n, "file_gb": round(path.stat().st_size / 1e9, 2), **ooc_peak(model, path, extra=args)})
        if n == npz_count:
            npz = scratch / f"calib_{n}.npz"
            np.savez(npz, x=np.load(path, mmap_mode="r"))
            rows.append({"source": ".npz (stored)", "samples": n, "file_gb": round(npz.stat().st_size / 1e9, 2), **ooc_peak(model, npz, extra=args)})
            npz.unlink()
        if n == memory_count:
            rows.append({"source": "in memory (np.load first)", "samples": n, "file_gb": round(path.stat().st_size / 1e9, 2), **ooc_peak(model, path, "memory")})
        path.unlink()
        print(json.dumps([r for r in rows if r["samples"] == n]), flush=True)
    calib = SMOLLM2 / "smollm2_calib.npz"
    for windows in llm_windows if calib.exists() else []:
        part = scratch / f"smollm2_{windows}.npz"
        np.savez(part, **{k: v[:windows] for k, v in np.load(calib).items()})
        args = ("--ratio", "0.2", "--batch-size", "4", "--verify-samples", "4")
        rows.append({"source": "SmolLM2 .npz (512-token windows)", "samples": windows, "file_gb": round(part.stat().st_size / 1e9, 4),
                     **ooc_peak(SMOLLM2 / "smollm2.dynamo.onnx", part, extra=args)})
        part.unlink()
        print(json.dumps(rows[-1]), flush=True)
    model.unlink()
    return rows


# -- 6. sequential recovery: tool time and peak RSS against the one-shot run ---------------------
SEQUENTIAL_CHILD = """
import sys, time, numpy as np, onnxprune
path, n, shape, key, mode = sys.argv[1], int(sys.argv[2]), tuple(map(int, sys.argv[3].split(','))), sys.argv[4], sys.argv[5]
x = np.random.default_rng(0).standard_normal(size=(n, *shape), dtype=np.float32)
open('/proc/self/clear_refs', 'w').write('5')
base = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))
start = time.perf_counter()
_, report = onnxprune.prune(path, {key: x}, flops=0.5, batch_size=32, round_to=8, sequential=mode != 'one-shot',
                            rechoose=mode in ('sequential', 'one-pass'), judge='one-shot' if mode == 'one-pass' else 'refit')
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(seconds, (peak - base) / 1024, report.fidelity[0].relative_l2, report.sequential.get('segments', 0))
"""


def sequential_cost(name: str, path: Path, shape, n: int, rounds: int = 5) -> dict:
    """Whole prune() runs, one-shot, --sequential (the default re-chooses units and judges auto's
    choice against uniform after both refits), --sequential --no-rechoose and --sequential
    --judge one-shot (one pass) interleaved in fresh processes: the ratios of the fastest runs'
    times to one-shot's, of their peak RSS growth, and the held-out error of each. Five rounds:
    with two, the ratio of these sub-second runs moved by +-0.2 between identical runs."""
    key = input_name(path)
    modes = ("one-shot", "sequential", "no-rechoose", "one-pass")
    runs: dict[str, list] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            child = subprocess.run([sys.executable, "-c", SEQUENTIAL_CHILD, str(path), str(n), ",".join(map(str, shape)), key, mode],
                                   capture_output=True, text=True, cwd=ROOT)
            if child.returncode:  # e.g. a model whose pinned spaces cap the MACs below the section's target
                return {"model": name, "samples": n, "mode": mode, "error": (child.stderr.strip().splitlines() or ["failed"])[-1]}
            runs[mode].append(tuple(map(float, child.stdout.split())))
    one, seq, plain, single = (min(runs[mode]) for mode in modes)
    return {"model": name, "samples": n, "segments": int(seq[3]), "time_ratio": round(seq[0] / one[0], 2),
            "time_ratio_no_rechoose": round(plain[0] / one[0], 2), "time_ratio_one_pass": round(single[0] / one[0], 2),
            "rss_growth_mb": [round(one[1]), round(seq[1]), round(plain[1])], "rss_ratio": round(seq[1] / max(one[1], 1), 2),
            "rel_l2": [round(one[2], 4), round(seq[2], 4), round(plain[2], 4)]}


def markdown(results: dict) -> str:
    lines = [] if "tool_time" not in results else sections_1_to_4(results)
    if results.get("out_of_core"):
        lines += ["", "## 5. Out-of-core calibration (peak RSS of a whole CLI run: calibration, verification, writing)", "",
                  "| calibration source | samples | file (GB) | peak RSS (MB) | growth over the imports (MB) | seconds |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['source']} | {r['samples']} | {r['file_gb']} | {r['peak_rss_mb']} | {r['growth_mb']} | {r['seconds']} |" for r in results["out_of_core"]]
    return "\n".join(lines) + "\n"


def sections_1_to_4(results: dict) -> list[str]:
    lines = ["## 1. Tool time (whole default run, verification included / one onnxruntime pass over the same calibration set)", "",
             "| model | samples | tool / forward | calibration / forward | samples x4 | tool / forward | calibration / forward | marginal (per extra sample) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['samples']} | {r['tool_over_forward']} | {r['calibrate_over_forward']} | {r['samples_4x']} | "
              f"{r['tool_over_forward_4x']} | {r['calibrate_over_forward_4x']} | {r['marginal_over_forward']} |" for r in results["tool_time"]]
    results = {"memory": [], "speed": [], "scale": [], **results}  # a run of some sections only
    if results["memory"]:
        lines += ["", "## 2. Memory (peak RSS growth of a pruning run over the process with its data loaded, less one plain onnxruntime session)", "",
                  "| model | budget 3x model + sum n^2 x 8 (MB) | session floor (MB) | " + " | ".join(f"{r['samples']} samples (MB)" for r in results["memory"][0]["runs"]) + " | within |",
                  "|---|---:|---:|" + "---:|" * len(results["memory"][0]["runs"]) + "---|"]
        lines += [f"| {m['model']} | {m['budget_mb']} | {m['session_floor_mb']} | " + " | ".join(str(r["rss_growth_mb"]) for r in m["runs"]) + f" | {m['within_budget']} |" for m in results["memory"]]
    if results.get("llm_memory"):
        runs = results["llm_memory"] if isinstance(results["llm_memory"], list) else [results["llm_memory"]]
        lines += ["", "| large model | samples | model (MB) | budget 3x model + sum n^2 x 8 (MB) | peak RSS growth (MB) | within |", "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {r['model']} | {r['samples']} x 512 tokens | {r['model_mb']} | {r['budget_mb']} | {r['peak_growth_mb']} | {r['within_budget']} |" for r in runs]
        for r in runs:
            if r.get("stage_peak_growth_mb"):
                lines += ["", f"peak RSS growth per stage at {r['samples']} windows (MB): " + ", ".join(f"{k} {v}" for k, v in r["stage_peak_growth_mb"].items())]
    lines += ["", "## 3. Pruned / original onnxruntime CPU latency (2 threads)", "",
              "| model | MACs removed | round-to | MACs ratio | latency ratio b1 | latency ratio b32 | <= 1.15 x MACs (b1, b32) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['macs_removed']:.0%} | {r['round_to']} | {r['macs_ratio']} | {r['latency_ratio_b1']} | {r['latency_ratio_b32']} | "
              f"{r['meets_1.15x_b1']}, {r['meets_1.15x_b32']} |" if "unreachable" not in r else
              f"| {r['model']} | {r['macs_removed']:.0%} | {r['round_to']} | n/a (unreachable) | | | |" for r in results["speed"]]
    lines += ["", "## 3b. Latency targets (`--latency F --round-to 8`, batch 1, 2 threads): the threshold searched by timing", "",
              "| model | latency removed (target) | MACs ratio | latency ratio measured by the tool | re-measured by the benchmark | candidates timed |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['latency_removed']:.0%} | {r['macs_ratio']} | {r['tool_measured_ratio']} | {r['bench_measured_ratio']} | {r['candidates_timed']} |"
              if "unreachable" not in r else f"| {r['model']} | {r['latency_removed']:.0%} | n/a (unreachable) | | | |" for r in results.get("latency_target", [])]
    lines += ["", "## 4. Linear algebra per wide layer (float64, LAPACK)", "", "| units | pivoted Cholesky s | ordered Cholesky s | LS recovery s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['units']} | {r.get('pivoted_cholesky_s', r.get('block_pivoted_s'))} | {r.get('ordered_cholesky_s', '-')} | {r.get('recovery_solve_s', '-')} |" for r in results["scale"]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--models", nargs="+", default=["vgg_bn", "resnet_fmnist", "mobilenetv2s", "mobilenet_v2", "efficientnet_lite0"])
    parser.add_argument("--wide", nargs="+", type=int, default=[4096, 8192, 16384], help="layer widths for item 4")
    parser.add_argument("--out", default=str(ROOT / "results" / "speed"))
    parser.add_argument("--scratch", default=str(ROOT / "results" / "speed" / "scratch"), help="where section 5 writes its synthetic calibration files")
    parser.add_argument("--ooc-samples", nargs="+", type=int, default=[1000, 5000, 20000], help="section 5: .npy sizes (20000 = 12 GB)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; the others are kept from an earlier <out>/results.json")
    args = parser.parse_args()
    models = [m for m in args.models if MODELS[m][0].exists()]
    targets, rounds, repeats = ([0.5], [1, 8], 10) if args.quick else ([0.3, 0.5, 0.7], [1, 8, 16], 30)
    counts = [256, 1024] if args.quick else [256, 1024, 4096]
    earlier = Path(args.out) / "results.json"
    results = json.loads(earlier.read_text()) if set(args.sections) != set(SECTIONS) and earlier.exists() else {}
    results.update({"threads": THREADS, "onnxruntime": ort.__version__})
    run = set(args.sections)
    if "tool_time" in run:
        results["tool_time"] = [tool_time(m, *MODELS[m], n=sample_count(MODELS[m][1], 512 if args.quick else 2048), batch=32) for m in models]
        print(json.dumps(results["tool_time"], indent=1), flush=True)
    if "memory" in run:
        results["memory"] = [memory(m, *MODELS[m], counts) for m in models if int(np.prod(MODELS[m][1])) < 10_000][:2]
        results["llm_memory"] = None if args.quick else [run for windows in LLM_WINDOWS if (run := llm_memory(windows)) is not None] or None
        print(json.dumps([results["memory"], results["llm_memory"]], indent=1), flush=True)
    if "speed" in run:
        results["speed"] = [row for m in models for row in pruned_speed(m, *MODELS[m], targets, rounds, repeats)]
    if "latency_target" in run:
        results["latency_target"] = [row for m in models for row in latency_targets(m, *MODELS[m], [0.3] if args.quick else [0.3, 0.5], repeats)]
        print(json.dumps(results["latency_target"], indent=1), flush=True)
    if "scale" in run:
        results["scale"] = wide_layers([4096] if args.quick else args.wide)
    if "out_of_core" in run:
        counts = [500, 2000] if args.quick else args.ooc_samples
        results["out_of_core"] = out_of_core(Path(args.scratch), counts, counts[len(counts) // 2], counts[0], [] if args.quick else [32, 128])
    if "sequential" in run:
        results["sequential"] = [sequential_cost(m, *MODELS[m], n=sample_count(MODELS[m][1], 512 if args.quick else 2048), rounds=2 if args.quick else 5)
                                 for m in models]
        print(json.dumps(results["sequential"], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"peak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB; wrote {out}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
