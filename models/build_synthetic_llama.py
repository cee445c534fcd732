"""Build a synthetic Llama-architecture decoder of about 1B parameters (random, seeded weights)
and export it to ONNX with external data, for measuring onnxprune on big models (issue 13).

    python models/build_synthetic_llama.py                 # ~2 min and ~8.5 GB RAM on 2 cores
    python models/build_synthetic_llama.py --layers 8      # a smaller one

Model: ``transformers.LlamaForCausalLM`` (fp32, eager attention) from a ``LlamaConfig`` with
hidden 2048, 20 layers, 32 query / 8 KV heads (GQA, head dim 64), SwiGLU FFN 5632, RMSNorm,
RoPE, vocab 32000, untied embeddings (1.03B parameters); weights are transformers' own
initialisation (normal, std 0.02) under ``torch.manual_seed(seed)``. It is exported exactly like
SmolLM2 (``export_smollm2.wrappers`` / ``export_nocache``: torch.export, opset 18, dynamic batch
and sequence, external data).

Writes, into ``--out`` (default ``~/.cache/onnxprune/models/llama1b``, not committed):

* ``llama1b.dynamo.onnx`` (+ ``.onnx.data``)  ``input_ids``, ``attention_mask`` int64
  [batch, sequence] -> ``logits`` [batch, sequence, 32000]
* ``llama1b_calib.npz``  ``input_ids`` (uniform random tokens, seed 0) / ``attention_mask``
  (ones) [32, 256] (the FFN sites need more than 5632 rows after the verification windows)
* ``llama1b_export.json`` config, parameter count, step times, file sizes, ORT vs torch diff

Measuring a prune of it (docs/speed.md, "Sequential pass on a 1B-parameter synthetic Llama"),
one process per run, torch not imported::

    python models/build_synthetic_llama.py --measure sequential   # -> llama1b_sequential.json
    python models/build_synthetic_llama.py --measure one-shot     # -> llama1b_one-shot.json
    python models/build_synthetic_llama.py --measure sequential --allocation global   # without auto's candidates

records the exact peak RSS (VmHWM, reset between stages) and the seconds of every pipeline
stage, and the time and peak RSS of every segment of the sequential pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from export_smollm2 import export_nocache, file_bytes, wrappers

DEFAULT_OUT = Path(os.path.expanduser("~/.cache/onnxprune/models/llama1b"))


def build_model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, intermediate_size=a.ffn, vocab_size=a.vocab,
                      tie_word_embeddings=a.tied, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0)
    torch.manual_seed(a.seed)
    return LlamaForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def measure(a, mode: str) -> dict:
    """One prune of the exported model; stage and segment peaks (VmHWM) and times."""
    import onnxprune
    from onnxprune import api

    path = a.out / f"{a.name}.dynamo.onnx"
    calib = a.out / f"{a.name}_calib.npz"
    base = status_mb("VmRSS")
    stage_peak: dict[str, float] = {}
    segments: list[dict] = []
    timed = api._stage

    @contextmanager
    def traced(seconds, name):
        stage_peak["between stages"] = max(stage_peak.get("between stages", 0), status_mb("VmHWM"))
        reset_peak()
        with timed(seconds, name):
            yield
        stage_peak[name] = max(stage_peak.get(name, 0), status_mb("VmHWM"))
        reset_peak()

    def progress(description, total):
        print(f"   {description}: {total}", flush=True)
        if description != "sequential fit":
            return lambda n: None
        last = [time.perf_counter()]

        def advance(n):
            now, hwm = time.perf_counter(), status_mb("VmHWM")
            segments.append({"seconds": round(now - last[0], 2), "peak_rss_mb": round(hwm)})
            print(f"   segment {len(segments)}/{total}: {now - last[0]:.1f}s, peak RSS {hwm:.0f} MB", flush=True)
            stage_peak["rewrite"] = max(stage_peak.get("rewrite", 0), hwm)
            reset_peak()
            last[0] = now
        return advance

    api._stage = traced
    t0 = time.perf_counter()
    result = onnxprune.prune(str(path), str(calib), params=a.params, sequential=mode == "sequential", allocation=a.allocation,
                             rechoose=not a.no_rechoose,
                             batch_size=a.batch_size, verify_samples=a.verify_samples, progress=progress)
    total = time.perf_counter() - t0
    stage_peak["between stages"] = max(stage_peak.get("between stages", 0), status_mb("VmHWM"))
    rep = result.report
    seg_s = [s["seconds"] for s in segments]
    out = {"mode": mode, "rechoose": not a.no_rechoose, "model": str(path), "params_target": a.params, "allocation": a.allocation, "batch_size": a.batch_size,
           "verify_samples": a.verify_samples, "base_rss_mb": round(base), "seconds_total": round(total, 1),
           "seconds": rep.seconds, "stage_peak_rss_mb": {k: round(v) for k, v in stage_peak.items()},
           "peak_rss_mb": round(max(stage_peak.values())),
           "params_before": rep.params_before, "params_after": rep.params_after,
           "fidelity": [asdict(f) for f in rep.fidelity], "sequential": {k: v for k, v in rep.sequential.items() if k != "sites"},
           "segments": segments,
           "segment_seconds": {"n": len(seg_s), "min": min(seg_s), "median": float(np.median(seg_s)), "max": max(seg_s)} if seg_s else None}
    (a.out / f"{a.name}_{mode}{'_no_rechoose' if a.no_rechoose else ''}.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("segments", "fidelity")}, indent=1, default=str))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Synthetic ~1B Llama -> ONNX (external data) + random calibration tokens")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--name", default="llama1b")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tied", action="store_true", help="tie the embedding and lm_head weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-calib", type=int, default=32, help="windows (an FFN site needs more rows than its 5632 units)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--measure", choices=("sequential", "one-shot"), help="prune the built model and measure (no build)")
    ap.add_argument("--params", type=float, default=0.2, help="with --measure: fraction of parameters to remove")
    ap.add_argument("--allocation", default="auto", help="with --measure: the allocation rule (global skips auto's three candidate runs)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--verify-samples", type=int, default=2)
    ap.add_argument("--no-rechoose", action="store_true", help="with --measure sequential: keep the plan's units (prune(rechoose=False))")
    ap.add_argument("--calib-only", action="store_true", help="write the calibration file only")
    a = ap.parse_args(argv)
    if a.measure:
        measure(a, a.measure)
        return

    import torch

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{a.name}.dynamo.onnx"
    summary: dict = {"generator": "models/build_synthetic_llama.py", "args": vars(a) | {"out": str(a.out)},
                     "seconds": {}}

    def timed(name, fn):
        t0 = time.time()
        print(f"== {name} ...", flush=True)
        res = fn()
        summary["seconds"][name] = round(time.time() - t0, 1)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"   {name}: {time.time() - t0:.1f}s, peak RSS so far {rss:.0f} MB", flush=True)
        return res

    rng = np.random.default_rng(a.seed)
    calib = rng.integers(0, a.vocab, size=(a.n_calib, a.window), dtype=np.int64)
    np.savez_compressed(a.out / f"{a.name}_calib.npz", input_ids=calib, attention_mask=np.ones_like(calib))
    if a.calib_only:
        return

    model = timed("build", lambda: build_model(a))
    summary["params"] = int(sum(p.numel() for p in model.parameters()))
    print(f"   {summary['params'] / 1e9:.3f}B parameters", flush=True)

    nc, _ = wrappers(model)
    probe = calib[:1, :32]
    with torch.no_grad():
        ref = nc(torch.from_numpy(probe), torch.ones(probe.shape, dtype=torch.int64)).numpy()
    timed("export", functools.partial(export_nocache, nc, path))
    del nc, model

    def ort_check():
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input_ids": probe, "attention_mask": np.ones_like(probe)})[0]
        return {"max_abs_diff_vs_torch_1x32": float(np.abs(got - ref).max()), "logit_scale": float(np.abs(ref).max())}

    summary["ort_check"] = timed("ort_check", ort_check)
    summary["sizes_bytes"] = file_bytes(path) | {p.name: p.stat().st_size for p in a.out.glob(f"{a.name}_calib.npz")}
    summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    (a.out / f"{a.name}_export.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
