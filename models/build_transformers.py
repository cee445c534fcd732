"""Build tiny synthetic transformers (BERT- and Llama-style) for onnxprune tests.

Rebuild (CPU only, well under a minute on 2 cores)::

    pip install torch==2.13.0 onnxscript onnx onnxruntime
    python models/build_transformers.py

No training: the weights are random but seeded (``SEED``), models run and export in eval
mode, and rerunning the script with the same versions gives byte-identical files.

Writes, into ``models/transformers/``:

* ``<name>.ts.onnx``     - TorchScript exporter (``dynamo=False``), opset 17, dynamic
  ``batch`` and ``sequence`` axes (``dynamic_axes``), default constant folding
* ``<name>.dynamo.onnx`` - torch.export exporter (``dynamo=True``), opset 18, dynamic batch
  and sequence via ``torch.export.Dim``, weights embedded
* ``calib_tokens.npz``   - ``input_ids`` int64 [64,32] (uniform random ids < 100, seed 1234)
  and ``attention_mask`` int64 [64,32] (all ones): for bert_tiny*, llama_tiny
* ``calib_tokens_kv.npz`` - for llama_tiny_kv: ``input_ids`` [64,16] (the second half of the
  calib_tokens rows) and ``past_key_<i>`` / ``past_value_<i>`` float32 [64,2,16,16] (the cache
  that llama_tiny_kv itself produces for the first 16 tokens of the same rows)
* ``manifest.json`` - per file: op counts, input/output names and shapes, how every Reshape
  gets its target shape (constant vs Shape->Gather->Unsqueeze->Concat subgraph), how
  softmax / mask / rotary / GQA / norms / activations appear, ORT-vs-torch max abs diff

Models (vocab 100, hidden 64, 2 layers; see ``manifest.json`` for the graphs):

* ``bert_tiny``          HF BertModel eager layout: word + position embeddings + LayerNorm;
  per layer separate Q/K/V ``nn.Linear`` (bias), ``view(x.size()[:-1] + (4, 16))`` +
  ``permute(0,2,1,3)``, ``q @ k^T / sqrt(16) + extended mask``, softmax(-1), ``@ v``,
  ``permute`` back + ``view(ctx.size()[:-2] + (64,))``, output dense + residual + LayerNorm,
  FFN Linear(64->256) - exact erf GELU - Linear(256->64) + residual + LayerNorm.
  Inputs ``input_ids``, ``attention_mask`` int64 [B,S] (S <= 64), output
  ``last_hidden_state`` [B,S,64].
* ``bert_tiny_fusedqkv`` the same with one Linear(64->192) + ``split(64, -1)`` into q, k, v.
* ``llama_tiny``         HF LlamaModel eager layout: embedding, RMSNorm written out
  (pow/mean/rsqrt/mul), 4 query heads / 2 KV heads (GQA, head dim 16, HF ``repeat_kv`` =
  ``[:, :, None].expand(...).reshape(...)``), rotary embedding with cos/sin computed inside
  the graph from ``arange`` positions, causal mask from position comparisons combined with the
  padding mask, SwiGLU FFN (gate/up 64->128, down 128->64, ``silu(gate) * up``), no biases,
  final RMSNorm, LM head Linear(64->100). Inputs ``input_ids``, ``attention_mask`` [B,S],
  output ``logits`` [B,S,100].
* ``llama_tiny_kv``      the same weights with a KV cache: inputs ``input_ids`` [B,S_new],
  ``past_key_<i>`` / ``past_value_<i>`` [B,2,S_past,16]; outputs ``logits`` [B,S_new,100],
  ``present_key_<i>`` / ``present_value_<i>`` [B,2,S_past+S_new,16]; positions start at
  S_past. No attention_mask (no padding). S_past = 0 works (empty cache).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "transformers"

SEED = 0
CALIB_SEED = 1234
TS_OPSET = 17
DYNAMO_OPSET = 18
MAX_FILE_BYTES = int(1.5 * 1024 * 1024)

VOCAB = 100
HIDDEN = 64
LAYERS = 2
MAX_POS = 64          # BERT learned position table
BERT_HEADS = 4
BERT_FFN = 256
LLAMA_HEADS = 4
LLAMA_KV_HEADS = 2
LLAMA_FFN = 128
HEAD_DIM = 16
ROPE_THETA = 10000.0
EPS_LN = 1e-12
EPS_RMS = 1e-6

N_CALIB = 64
CALIB_LEN = 32
KV_PAST = 16


# =========================================================================== BERT
class BertEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(MAX_POS, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS_LN)
        # HF keeps position ids as a buffer and slices it to the sequence length
        self.register_buffer("position_ids", torch.arange(MAX_POS).unsqueeze(0), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_length = input_ids.size(1)
        position_ids = self.position_ids[:, :seq_length]
        emb = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.LayerNorm(emb)


class BertSelfAttention(nn.Module):
    def __init__(self, fused_qkv: bool) -> None:
        super().__init__()
        self.num_attention_heads = BERT_HEADS
        self.attention_head_size = HIDDEN // BERT_HEADS
        self.all_head_size = HIDDEN
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        else:
            self.query = nn.Linear(HIDDEN, HIDDEN)
            self.key = nn.Linear(HIDDEN, HIDDEN)
            self.value = nn.Linear(HIDDEN, HIDDEN)

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        # x.size()-based target -> Shape/Gather/Unsqueeze/Concat in the TorchScript export
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        if self.fused_qkv:
            q, k, v = self.qkv(hidden_states).split(self.all_head_size, dim=-1)
        else:
            q = self.query(hidden_states)
            k = self.key(hidden_states)
            v = self.value(hidden_states)
        query_layer = self.transpose_for_scores(q)
        key_layer = self.transpose_for_scores(k)
        value_layer = self.transpose_for_scores(v)
        scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        scores = scores / math.sqrt(self.attention_head_size)
        scores = scores + extended_mask
        probs = F.softmax(scores, dim=-1)
        context = torch.matmul(probs, value_layer)
        context = context.permute(0, 2, 1, 3).contiguous()
        new_context_shape = context.size()[:-2] + (self.all_head_size,)
        return context.view(new_context_shape)


class BertLayer(nn.Module):
    def __init__(self, fused_qkv: bool) -> None:
        super().__init__()
        self.attention = BertSelfAttention(fused_qkv)
        self.attention_output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=EPS_LN)
        self.intermediate = nn.Linear(HIDDEN, BERT_FFN)
        self.output = nn.Linear(BERT_FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=EPS_LN)

    def forward(self, h: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention(h, extended_mask)
        h = self.attention_norm(self.attention_output(a) + h)
        f = self.output(F.gelu(self.intermediate(h)))  # exact (erf) GELU
        return self.output_norm(f + h)


class BertTiny(nn.Module):
    def __init__(self, fused_qkv: bool = False) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings()
        self.layers = nn.ModuleList([BertLayer(fused_qkv) for _ in range(LAYERS)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        # HF get_extended_attention_mask: [B,1,1,S], 0 where attended, finfo.min where masked
        ext = attention_mask[:, None, None, :].to(h.dtype)
        ext = (1.0 - ext) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, ext)
        return h


# =========================================================================== Llama
class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = EPS_RMS

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF repeat_kv: [B, kv, S, d] -> [B, kv*n_rep, S, d] via expand + reshape."""
    batch, num_kv, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_kv * n_rep, slen, head_dim)


class LlamaAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = LLAMA_HEADS
        self.num_kv = LLAMA_KV_HEADS
        self.head_dim = HEAD_DIM
        self.n_rep = LLAMA_HEADS // LLAMA_KV_HEADS
        self.q_proj = nn.Linear(HIDDEN, LLAMA_HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, LLAMA_KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, LLAMA_KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(LLAMA_HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None):
        input_shape = h.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(h).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(h).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(h).view(hidden_shape).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        present = (k, v)
        k_rep = repeat_kv(k, self.n_rep)
        v_rep = repeat_kv(v, self.n_rep)
        scores = torch.matmul(q, k_rep.transpose(2, 3)) * (self.head_dim ** -0.5)
        scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v_rep)
        out = out.transpose(1, 2).contiguous()
        out = out.reshape(*input_shape, -1)
        return self.o_proj(out), present


class LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, LLAMA_FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, LLAMA_FFN, bias=False)
        self.down_proj = nn.Linear(LLAMA_FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = LlamaAttention()
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.mlp = LlamaMLP()

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None):
        a, present = self.self_attn(self.input_layernorm(h), cos, sin, mask, past_k, past_v)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, present


class LlamaTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([LlamaLayer() for _ in range(LAYERS)])
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, positions: torch.Tensor):
        # positions: [S] int64 -> cos/sin [1,1,S,head_dim], computed in the graph
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward(self, input_ids, attention_mask=None, past=None):
        h = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        past_len = past[0][0].shape[2] if past is not None else 0
        q_pos = torch.arange(past_len, past_len + seq, device=input_ids.device)
        k_pos = torch.arange(0, past_len + seq, device=input_ids.device)
        cos, sin = self.rotary(q_pos)
        allowed = k_pos[None, :] <= q_pos[:, None]                      # [S, S_total] causal
        allowed = allowed[None, None]                                  # [1,1,S,S_total]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].to(torch.bool)
        min_value = torch.finfo(h.dtype).min
        mask = torch.where(allowed, torch.tensor(0.0, dtype=h.dtype), torch.tensor(min_value, dtype=h.dtype))
        presents = []
        for i, layer in enumerate(self.layers):
            pk, pv = past[i] if past is not None else (None, None)
            h, present = layer(h, cos, sin, mask, pk, pv)
            presents.append(present)
        return self.lm_head(self.norm(h)), presents


class LlamaNoCache(nn.Module):
    def __init__(self, core: LlamaTiny) -> None:
        super().__init__()
        self.core = core

    def forward(self, input_ids, attention_mask):
        return self.core(input_ids, attention_mask)[0]


class LlamaWithCache(nn.Module):
    def __init__(self, core: LlamaTiny) -> None:
        super().__init__()
        self.core = core

    def forward(self, input_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(LAYERS)]
        logits, presents = self.core(input_ids, None, past)
        out = [logits]
        for k, v in presents:
            out += [k, v]
        return tuple(out)


# =========================================================================== helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def randomise(model: nn.Module) -> None:
    """Seeded random weights with O(1) activations (non-trivial softmax/GELU/SiLU)."""
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2 and "embeddings" not in name and "embed_tokens" not in name:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        elif p.dim() == 2:  # embedding tables
            p.normal_(0.0, 1.0)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.1)
        else:  # LayerNorm / RMSNorm gains
            p.copy_(1.0 + 0.1 * torch.randn_like(p))


def _shape(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def embed_external_data(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=True)
    stray = sorted(p for p in path.parent.glob(path.name + "*") if p != path)
    ext = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if ext or stray:
        onnx.save_model(model, str(path), save_as_external_data=False)
        for p in stray:
            p.unlink()


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- exporters
def export_ts(model, args, path, input_names, output_names, dynamic_axes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=TS_OPSET,
            input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
        )


def export_dynamo(model, args, path, input_names, output_names, dynamic_shapes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, args, dynamo=True, opset_version=DYNAMO_OPSET,
            input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, external_data=False,
        )
    prog.save(str(path), external_data=False)


# --------------------------------------------------------------------------- graph analysis
def _producers(g: onnx.GraphProto) -> dict:
    return {o: n for n in g.node for o in n.output}


def _upstream_ops(value: str, prod: dict, consts: set, graph_inputs: set, limit: int = 64):
    """Op types (and graph inputs) feeding `value`, stopping at constants and at Shape ops
    (a Shape's input is the tensor being measured, not part of the target computation)."""
    seen, ops, roots, stack = set(), collections.Counter(), set(), [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v in seen or v == "":
            continue
        seen.add(v)
        if v in consts:
            continue
        if v in graph_inputs:
            roots.add(v)
            continue
        n = prod.get(v)
        if n is None:
            continue
        ops[n.op_type] += 1
        if n.op_type == "Shape":
            roots.add("Shape(" + (prod[n.input[0]].op_type if n.input[0] in prod else n.input[0]) + ")")
            continue
        stack.extend(n.input)
    return ops, roots


def reshape_targets(model: onnx.ModelProto) -> list:
    g = model.graph
    prod = _producers(g)
    inits = {t.name for t in g.initializer}
    const_nodes = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consts = inits | const_nodes
    graph_inputs = {i.name for i in g.input}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        etype = {v.name: v.type.tensor_type.elem_type
                 for v in list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    except Exception:  # pragma: no cover
        etype = {}
    out = []
    for n in g.node:
        if n.op_type != "Reshape":
            continue
        if etype.get(n.input[0]) == onnx.TensorProto.INT64:
            # reshape of a shape tensor (TorchScript's Expand target plumbing), not of data
            out.append({"node": n.name, "target": "shape-tensor reshape (int64 data, not activations)"})
            continue
        tgt = n.input[1]
        if tgt in inits:
            t = next(t for t in g.initializer if t.name == tgt)
            out.append({"node": n.name, "target": "initializer",
                        "value": onnx.numpy_helper.to_array(t).tolist()})
        elif tgt in const_nodes:
            c = prod[tgt]
            val = onnx.numpy_helper.to_array(c.attribute[0].t).tolist() if c.attribute else None
            out.append({"node": n.name, "target": "Constant node", "value": val})
        else:
            ops, roots = _upstream_ops(tgt, prod, consts, graph_inputs)
            out.append({"node": n.name, "target": "computed", "producer": prod[tgt].op_type,
                        "subgraph_ops": dict(sorted(ops.items())), "from_inputs": sorted(roots)})
    return out


def describe(path: Path) -> dict:
    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    rs = reshape_targets(model)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": i.name, "shape": _shape(i),
                    "dtype": onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name}
                   for i in g.input if i.name not in inits],
        "outputs": [{"name": o.name, "shape": _shape(o)} for o in g.output],
        "node_count": len(g.node),
        "op_counts": dict(sorted(ops.items())),
        "initializer_count": len(g.initializer),
        "initializer_elements": int(sum(np.prod(t.dims, dtype=np.int64) for t in g.initializer)),
        "reshape_target_summary": dict(collections.Counter(
            r["target"] if r["target"] != "computed" else
            "computed(" + "/".join(sorted(r["subgraph_ops"])) + ")" for r in rs)),
        "reshapes": rs,
        "matmul_weights": _matmul_summary(model),
    }


def _matmul_summary(model: onnx.ModelProto) -> dict:
    g = model.graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    prod = _producers(g)
    c = collections.Counter()
    for n in g.node:
        if n.op_type == "Gemm":
            c["Gemm(const weight)"] += 1
        elif n.op_type == "MatMul":
            b = n.input[1]
            if b in inits:
                c[f"MatMul(const weight {'x'.join(map(str, inits[b]))})"] += 1
            elif b in prod and prod[b].op_type == "Transpose" and prod[b].input[0] in inits:
                c["MatMul(Transpose(const weight))"] += 1
            else:
                c["MatMul(activation x activation)"] += 1
    return dict(sorted(c.items()))


def check_model_file(path: Path) -> None:
    embed_external_data(path)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RuntimeError(f"{path.name} is {size} bytes (> 1.5 MB)")


# =========================================================================== notes
BERT_NOTES = {
    "ts": {
        "qkv": "separate q/k/v: 3 x MatMul(x, pre-transposed [64,64] initializer) + Add(bias, .)",
        "qkv_fused": "one MatMul [64,192] + Add(bias), then Split(axis=-1, split=[64,64,64] given as a "
                     "Constant input) into q, k, v",
        "head_reshape": "Reshape [B,S,64]->[B,S,4,16]; target = Concat(Unsqueeze(Gather(Shape(x),0)), "
                        "Unsqueeze(Gather(Shape(x),1)), Constant [4], Constant [16]) computed from the tensor "
                        "being reshaped (one Shape/Gather/Unsqueeze/Concat chain per Reshape); context "
                        "Reshape [B,S,4,16]->[B,S,64] likewise with Constant [64]",
        "head_transpose": "Transpose perm [0,2,1,3] on q and v; k gets perm [0,2,3,1] (permute + "
                          "transpose(-1,-2) fused); context Transpose [0,2,1,3] back before the Reshape",
        "scores": "MatMul(q, k^T) -> Div by Constant 4.0 (sqrt 16) -> Add extended mask -> Softmax(axis=-1) "
                  "-> MatMul(probs, v)",
        "mask": "attention_mask -> Unsqueeze(1) -> Unsqueeze(2) -> Cast(float) -> Sub(1.0, .) -> "
                "Mul(., -3.4028e38): additive mask [B,1,1,S], computed once and shared by all layers",
        "position_ids": "the position_ids buffer is a Constant node [1,64], Slice'd to "
                        "Gather(Shape(input_ids),1) and Gather'ed from the position table",
        "gelu": "exact GELU as Div(x, 1.4142) -> Erf -> Add 1 -> Mul x -> Mul 0.5 (Constant nodes)",
        "layernorm": "LayerNormalization op (axis -1, eps 1e-12)",
    },
    "dynamo": {
        "qkv": "separate q/k/v: MatMul(x, [64,64] initializer) + Add(., bias)",
        "qkv_fused": "MatMul [64,192] + Add, then Split(axis=2, num_outputs=3) (opset 18, no split input)",
        "head_reshape": "Reshape(allowzero=1) [B,S,64]->[B,S,4,16]; target = Concat(Shape(attention_mask, "
                        "start=0,end=1), Shape(attention_mask, start=1,end=2), [4], [16]) - dims come from the "
                        "graph input, not from the reshaped tensor, and ONE Concat is shared by all q/k/v "
                        "Reshapes of all layers (another shared Concat(B, S, [64]) for the context)",
        "head_transpose": "Transpose perm [0,2,1,3] on q and v; k gets perm [0,2,3,1] (fused by the "
                          "optimiser); context Transpose [0,2,1,3] back",
        "scores": "MatMul -> Div by 4.0 -> Add mask -> Softmax(axis=-1) -> MatMul",
        "mask": "attention_mask -> Unsqueeze([1,2]) -> Cast -> Sub(1.0, .) -> Mul(., -3.4028e38)",
        "position_ids": "Slice of the [1,64] position_ids initializer to Shape(attention_mask, 1, 2)",
        "gelu": "exact GELU as Div(1.4142) -> Erf -> Add 1 -> Mul 0.5 -> Mul x (opset 18 has no Gelu op)",
        "layernorm": "LayerNormalization op (stash_type 1)",
    },
}

LLAMA_NOTES = {
    "ts": {
        "qkv": "separate q/k/v, no bias: MatMul with constant weights q [64,64], k/v [64,32] (GQA)",
        "head_reshape": "view(*input_shape, -1, 16): target Concat(Unsqueeze(Gather(Shape(h),0)), "
                        "Unsqueeze(Gather(Shape(h),1)), [-1], [16]) - the head count is -1, not a constant; "
                        "context Reshape target Concat(B, S, [-1])",
        "head_transpose": "Transpose [0,2,1,3] on q/k/v; k^T as Transpose [0,1,3,2] after repeat_kv",
        "gqa_repeat_kv": "k/v [B,2,S,16] -> Unsqueeze(2) -> Expand(target = Concat of Gather(Shape(k),0..3) "
                         "and Constant [2] (n_rep), through TorchScript's Reshape(-1)/ConstantOfShape/Equal/"
                         "Where plumbing) -> Reshape target Concat(B, Mul(Gather(Shape(k),1), 2), S, 16)",
        "rope": "computed in the graph: Range(0, Cast(Gather(Shape(input_ids),1)), 1) -> Cast float -> "
                "Unsqueeze -> Mul by inv_freq (Constant node [1,8]) -> Concat(f,f) -> Cos / Sin -> "
                "Unsqueeze x2; rotate_half = 2 Slices on axis 3 whose bounds are computed "
                "(Gather(Shape(q),3) / 2 -> Cast) -> Neg -> Concat; q*cos + rotate_half(q)*sin",
        "causal_mask": "LessOrEqual(Unsqueeze(Range,0), Unsqueeze(Range,1)) (k_pos <= q_pos) -> Unsqueeze x2 -> "
                       "And(Cast(Unsqueeze(attention_mask), bool)) -> Where(., 0.0, -3.4028e38) -> Add to scores "
                       "(one mask shared by all layers)",
        "softmax": "MatMul(q, k^T) -> Mul 0.25 -> Add mask -> Softmax(axis=-1) -> Cast(float) -> Cast(float) "
                   "(no-op casts from softmax(dtype=float32).to(q.dtype)) -> MatMul(., v)",
        "swiglu": "MatMul(gate) -> Sigmoid -> Mul (= SiLU) -> Mul with MatMul(up) -> MatMul(down)",
        "rmsnorm": "Pow(x, 2) -> ReduceMean(axes=[-1], keepdims=1) -> Add eps -> Sqrt -> Div(1.0, .) -> "
                   "Mul(x, .) -> Mul(weight, .)",
    },
    "dynamo": {
        "qkv": "separate q/k/v, no bias: MatMul with constant weights q [64,64], k/v [64,32] (GQA)",
        "head_reshape": "Reshape(allowzero=1) target Concat(Shape(attention_mask,0,1), Shape(attention_mask,1,2), "
                        "[-1], [16]) shared by q/k/v of all layers; context Reshape target Concat(B, S, [-1])",
        "head_transpose": "Transpose [0,2,1,3] on q/k/v; k^T as Transpose [0,1,3,2] after repeat_kv",
        "gqa_repeat_kv": "Unsqueeze(k, 2) -> Expand to Concat(B, [2], [2], S, [16]) -> Reshape to "
                         "Concat(B, [4], S, [16]): kv heads (2), n_rep (2) and heads (4) are constants "
                         "inside the shape Concats",
        "rope": "computed in the graph: Range(0, S, 1) -> Cast -> Unsqueeze -> Mul inv_freq (initializer "
                "[1,8]) -> Concat -> Cos / Sin -> Unsqueeze([0,1]); rotate_half = Slice [0:8] and [8:] with "
                "constant bounds on axis 3 -> Neg -> Concat",
        "causal_mask": "LessOrEqual(Unsqueeze(Range,0), Unsqueeze(Range,1)) -> Unsqueeze([0,1]) -> "
                       "And(Cast(Unsqueeze(attention_mask,[1,2]), bool)) -> Where(., 0.0, -3.4028e38)",
        "softmax": "MatMul -> Mul 0.25 -> Add mask -> Softmax(axis=-1) -> MatMul (no casts)",
        "swiglu": "MatMul(gate) -> Sigmoid -> Mul (= SiLU) -> Mul with MatMul(up) -> MatMul(down)",
        "rmsnorm": "Pow(x, 2) -> ReduceMean(axes input [-1], keepdims=1) -> Add eps -> Sqrt -> Reciprocal -> "
                   "Mul(x, .) -> Mul(weight, .)",
    },
}

KV_NOTES = {
    "ts": "Concat(past, new) on axis 2 for k (after RoPE) and v; the Concat outputs are the present_* "
          "graph outputs; positions Range(S_past, S_past + S_new) with S_past = Gather(Shape(past_key_0), 2); "
          "the causal mask compares Range(0, S_past+S_new) with it (no attention_mask input)",
    "dynamo": "same; S_past from Shape(past_value_0, start=2, end=3) -> Squeeze, the batch dim of every "
              "reshape target from Shape(past_key_1, 0, 1); the repeat_kv targets use S_past + S_new "
              "(an Add of the two symbolic sizes -> Reshape [-1])",
}


def analyse_patterns(model: onnx.ModelProto) -> dict:
    """Automatic pattern notes from the graph itself (complements the hand-written notes)."""
    g = model.graph
    prod = _producers(g)
    inits = {t.name: t for t in g.initializer}
    ops = collections.Counter(n.op_type for n in g.node)
    notes = {}
    tr = collections.Counter()
    for n in g.node:
        if n.op_type == "Transpose":
            perm = [a.ints for a in n.attribute if a.name == "perm"]
            tr[str(list(perm[0])) if perm else "default"] += 1
    notes["transpose_perms"] = dict(tr)
    sm = [n for n in g.node if n.op_type == "Softmax"]
    notes["softmax"] = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in sm]
    sm_inputs = collections.Counter()
    for n in sm:
        p = prod.get(n.input[0])
        chain = []
        while p is not None and len(chain) < 4:
            chain.append(p.op_type)
            nxt = [prod.get(i) for i in p.input if i in prod]
            p = nxt[0] if nxt else None
        sm_inputs[" <- ".join(chain)] += 1
    notes["softmax_input_chain"] = dict(sm_inputs)
    for op in ("Erf", "Sigmoid", "Tanh", "Gelu", "Cos", "Sin", "Range", "Trilu", "Where",
               "LessOrEqual", "Less", "Expand", "Split", "Slice", "Pow", "ReduceMean", "Sqrt",
               "Reciprocal", "LayerNormalization", "Gather", "Shape", "Concat", "Neg",
               "Softmax", "ConstantOfShape", "And", "Not", "Cast", "Equal"):
        if ops.get(op):
            notes.setdefault("op_presence", {})[op] = ops[op]
    splits = []
    for n in g.node:
        if n.op_type == "Split":
            s = n.input[1] if len(n.input) > 1 else None
            val = onnx.numpy_helper.to_array(inits[s]).tolist() if s in inits else s
            splits.append({"axis": [onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"],
                           "split": val, "outputs": len(n.output)})
    if splits:
        notes["splits"] = splits
    return notes


# =========================================================================== build
def build_bert(name: str, fused: bool, calib: dict, report: dict) -> None:
    seed_everything(SEED)
    model = BertTiny(fused_qkv=fused)
    randomise(model)
    model.eval()
    ids = torch.from_numpy(calib["input_ids"][:2, :12].copy())
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding in the example so nothing specialises on an all-ones mask
    args = (ids, mask)
    in_names, out_names = ["input_ids", "attention_mask"], ["last_hidden_state"]
    dyn_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"}}
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=MAX_POS)
    dyn_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})

    def run_torch(ids_np, mask_np):
        with torch.no_grad():
            return model(torch.from_numpy(ids_np), torch.from_numpy(mask_np)).numpy()

    tests = _bert_tests(calib)
    for kind in ("ts", "dynamo"):
        path = OUT_DIR / f"{name}.{kind}.onnx"
        t0 = time.time()
        if kind == "ts":
            export_ts(model, args, path, in_names, out_names, dyn_axes)
        else:
            export_dynamo(model, args, path, in_names, out_names, dyn_shapes)
        check_model_file(path)
        sess = ort_session(path)
        diffs = {}
        for label, (ids_np, mask_np) in tests.items():
            ref = run_torch(ids_np, mask_np)
            got = sess.run(None, {"input_ids": ids_np, "attention_mask": mask_np})[0]
            diffs[label] = float(np.abs(ref - got).max())
        worst = max(diffs.values())
        assert worst < 1e-4, (path.name, diffs)
        info = describe(path)
        info.update({
            "model": name,
            "exporter": "torchscript (dynamo=False)" if kind == "ts" else "torch.export (dynamo=True)",
            "torch_param_count": int(sum(p.numel() for p in model.parameters())),
            "calibration_data": "calib_tokens.npz",
            "max_abs_diff_vs_torch": worst,
            "max_abs_diff_vs_torch_per_test": diffs,
            "patterns": analyse_patterns(onnx.load(str(path))),
            "notes": {k: v for k, v in BERT_NOTES[kind].items()
                      if not (k == "qkv" and fused) and not (k == "qkv_fused" and not fused)},
        })
        report["models"][path.name] = info
        print(f"  {path.name}: {info['bytes']} B, max|diff| {worst:.2e}, reshapes "
              f"{info['reshape_target_summary']} ({time.time() - t0:.1f}s)", flush=True)


def _bert_tests(calib: dict) -> dict:
    ids = calib["input_ids"]
    rng = np.random.default_rng(99)
    m = np.ones((3, 20), dtype=np.int64)
    m[1, 15:] = 0
    m[2, 5:] = 0
    return {
        "calib_first8_32tok": (ids[:8].copy(), np.ones((8, 32), dtype=np.int64)),
        "batch1_seq1": (ids[:1, :1].copy(), np.ones((1, 1), dtype=np.int64)),
        "batch3_seq20_padded": (rng.integers(0, VOCAB, (3, 20), dtype=np.int64), m),
        "batch2_seq64": (rng.integers(0, VOCAB, (2, 64), dtype=np.int64), np.ones((2, 64), dtype=np.int64)),
    }


def build_llama(calib: dict, report: dict) -> None:
    seed_everything(SEED)
    core = LlamaTiny()
    randomise(core)
    core.eval()
    nocache = LlamaNoCache(core).eval()
    withcache = LlamaWithCache(core).eval()
    n_params = int(sum(p.numel() for p in core.parameters()))

    # ---------------- llama_tiny (no cache)
    ids = torch.from_numpy(calib["input_ids"][:2, :12].copy())
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the example
    in_names, out_names = ["input_ids", "attention_mask"], ["logits"]
    dyn_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"}}
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("sequence", min=1, max=4096)
    dyn_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    rng = np.random.default_rng(7)
    m = np.ones((3, 20), dtype=np.int64)
    m[1, :4] = 0
    m[2, 17:] = 0
    tests = {
        "calib_first8_32tok": (calib["input_ids"][:8].copy(), np.ones((8, 32), dtype=np.int64)),
        "batch1_seq1": (calib["input_ids"][:1, :1].copy(), np.ones((1, 1), dtype=np.int64)),
        "batch3_seq20_padded": (rng.integers(0, VOCAB, (3, 20), dtype=np.int64), m),
        "batch2_seq100": (rng.integers(0, VOCAB, (2, 100), dtype=np.int64), np.ones((2, 100), dtype=np.int64)),
    }
    for kind in ("ts", "dynamo"):
        path = OUT_DIR / f"llama_tiny.{kind}.onnx"
        t0 = time.time()
        if kind == "ts":
            export_ts(nocache, (ids, mask), path, in_names, out_names, dyn_axes)
        else:
            export_dynamo(nocache, (ids, mask), path, in_names, out_names, dyn_shapes)
        check_model_file(path)
        sess = ort_session(path)
        diffs = {}
        for label, (a, b) in tests.items():
            with torch.no_grad():
                ref = nocache(torch.from_numpy(a), torch.from_numpy(b)).numpy()
            got = sess.run(None, {"input_ids": a, "attention_mask": b})[0]
            # fully padded query rows are garbage in both; compare only attended positions
            keep = b.astype(bool)
            diffs[label] = float(np.abs(ref - got)[keep].max())
        worst = max(diffs.values())
        assert worst < 1e-4, (path.name, diffs)
        info = describe(path)
        info.update({
            "model": "llama_tiny",
            "exporter": "torchscript (dynamo=False)" if kind == "ts" else "torch.export (dynamo=True)",
            "torch_param_count": n_params,
            "calibration_data": "calib_tokens.npz",
            "max_abs_diff_vs_torch": worst,
            "max_abs_diff_vs_torch_per_test": diffs,
            "patterns": analyse_patterns(onnx.load(str(path))),
            "notes": dict(LLAMA_NOTES[kind]),
        })
        report["models"][path.name] = info
        print(f"  {path.name}: {info['bytes']} B, max|diff| {worst:.2e}, reshapes "
              f"{info['reshape_target_summary']} ({time.time() - t0:.1f}s)", flush=True)

    # ---------------- llama_tiny_kv
    past_names = []
    for i in range(LAYERS):
        past_names += [f"past_key_{i}", f"past_value_{i}"]
    present_names = [n.replace("past_", "present_") for n in past_names]
    in_names = ["input_ids"] + past_names
    out_names = ["logits"] + present_names
    ex_ids = torch.from_numpy(calib["input_ids"][:2, 5:8].copy())
    ex_past = tuple(torch.randn(2, LLAMA_KV_HEADS, 5, HEAD_DIM) for _ in past_names)
    dyn_axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for n in past_names:
        dyn_axes[n] = {0: "batch", 2: "past_sequence"}
    for n in present_names:
        dyn_axes[n] = {0: "batch", 2: "total_sequence"}
    past_seq = torch.export.Dim("past_sequence", min=0, max=4096)
    # forward(input_ids, *past_flat): torch.export sees 2 inputs, the varargs as one tuple
    dyn_shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_seq} for _ in past_names))

    nc_path = OUT_DIR / "llama_tiny.ts.onnx"
    nc_sess = ort_session(nc_path)
    for kind in ("ts", "dynamo"):
        path = OUT_DIR / f"llama_tiny_kv.{kind}.onnx"
        t0 = time.time()
        try:
            if kind == "ts":
                export_ts(withcache, (ex_ids, *ex_past), path, in_names, out_names, dyn_axes)
            else:
                export_dynamo(withcache, (ex_ids, *ex_past), path, in_names, out_names, dyn_shapes)
            check_model_file(path)
        except Exception as e:  # only one exporter is required for the KV model
            print(f"  {path.name}: export FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            report["models"][path.name] = {"file": path.name, "failed": f"{type(e).__name__}: {str(e)[:2000]}"}
            if path.exists():
                path.unlink()
            continue
        sess = ort_session(path)
        diffs = _kv_checks(sess, withcache, nc_sess, calib)
        worst = max(diffs.values())
        assert worst < 1e-4, (path.name, diffs)
        info = describe(path)
        info.update({
            "model": "llama_tiny_kv",
            "exporter": "torchscript (dynamo=False)" if kind == "ts" else "torch.export (dynamo=True)",
            "torch_param_count": n_params,
            "same_weights_as": f"llama_tiny.{kind}.onnx",
            "calibration_data": "calib_tokens_kv.npz",
            "max_abs_diff": worst,
            "max_abs_diff_per_test": diffs,
            "patterns": analyse_patterns(onnx.load(str(path))),
            "notes": dict(LLAMA_NOTES[kind], kv_cache=KV_NOTES[kind]),
        })
        report["models"][path.name] = info
        print(f"  {path.name}: {info['bytes']} B, max|diff| {worst:.2e}, reshapes "
              f"{info['reshape_target_summary']} ({time.time() - t0:.1f}s)", flush=True)

    # calibration inputs for the KV model: cache of the first KV_PAST tokens
    kv_path = next((OUT_DIR / f"llama_tiny_kv.{k}.onnx" for k in ("ts", "dynamo")
                    if (OUT_DIR / f"llama_tiny_kv.{k}.onnx").exists()), None)
    assert kv_path is not None, "no llama_tiny_kv export worked"
    sess = ort_session(kv_path)
    ids_all = calib["input_ids"]
    empty = {n: np.zeros((N_CALIB, LLAMA_KV_HEADS, 0, HEAD_DIM), np.float32) for n in past_names}
    outs = sess.run(None, {"input_ids": ids_all[:, :KV_PAST].copy(), **empty})
    kv_calib = {"input_ids": ids_all[:, KV_PAST:].copy()}
    for n, arr in zip(present_names, outs[1:], strict=False):
        kv_calib[n.replace("present_", "past_")] = arr.astype(np.float32)
    np.savez_compressed(OUT_DIR / "calib_tokens_kv.npz", **kv_calib)
    report["data"]["calib_tokens_kv.npz"] = {
        "keys": {k: list(v.shape) for k, v in kv_calib.items()},
        "dtypes": {k: v.dtype.name for k, v in kv_calib.items()},
        "how": f"input_ids = calib_tokens input_ids[:, {KV_PAST}:]; past_* = present_* of "
               f"{kv_path.name} run on input_ids[:, :{KV_PAST}] with an empty cache",
        "for": ["llama_tiny_kv.ts.onnx", "llama_tiny_kv.dynamo.onnx"],
    }


def _kv_checks(sess, withcache, nc_sess, calib) -> dict:
    """Cached ORT runs vs torch and vs the no-cache ORT model."""
    names = [i.name for i in sess.get_inputs()]
    past_names = names[1:]
    diffs = {}
    ids = calib["input_ids"][:4, :20].copy()
    B = ids.shape[0]
    full = nc_sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]

    # (a) chunked prefill: empty cache -> 12 tokens, then 8 more with the cache
    past = {n: np.zeros((B, LLAMA_KV_HEADS, 0, HEAD_DIM), np.float32) for n in past_names}
    o1 = sess.run(None, {"input_ids": ids[:, :12], **past})
    past = dict(zip(past_names, o1[1:], strict=False))
    o2 = sess.run(None, {"input_ids": ids[:, 12:], **past})
    assert o2[1].shape == (B, LLAMA_KV_HEADS, 20, HEAD_DIM), o2[1].shape
    diffs["chunked_12+8_vs_nocache"] = float(np.abs(np.concatenate([o1[0], o2[0]], 1) - full).max())

    # torch reference for the cached step
    with torch.no_grad():
        tp = tuple(torch.from_numpy(past[n]) for n in past_names)
        t2 = withcache(torch.from_numpy(ids[:, 12:]), *tp)
    diffs["cached_step_vs_torch"] = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(o2, t2, strict=False))

    # (b) 2-step greedy generation loop vs the no-cache model on the grown sequence
    prompt = calib["input_ids"][4:7, :8].copy()
    past = {n: np.zeros((prompt.shape[0], LLAMA_KV_HEADS, 0, HEAD_DIM), np.float32) for n in past_names}
    seq = prompt
    step_in = prompt
    gen_diff = 0.0
    for _step in range(3):  # prefill + 2 generated tokens
        o = sess.run(None, {"input_ids": step_in, **past})
        past = dict(zip(past_names, o[1:], strict=False))
        ref = nc_sess.run(None, {"input_ids": seq, "attention_mask": np.ones_like(seq)})[0]
        gen_diff = max(gen_diff, float(np.abs(o[0] - ref[:, -step_in.shape[1]:]).max()))
        nxt = o[0][:, -1].argmax(-1)[:, None].astype(np.int64)
        seq = np.concatenate([seq, nxt], 1)
        step_in = nxt
    diffs["greedy_prefill8_plus_2_steps_vs_nocache"] = gen_diff
    return diffs


# =========================================================================== main
def main() -> None:
    t_start = time.time()
    torch.set_num_threads(2)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        import onnxscript
        onnxscript_version = onnxscript.__version__
    except Exception:  # pragma: no cover
        onnxscript_version = None
    print(f"torch {torch.__version__}, onnxscript {onnxscript_version}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}", flush=True)

    rng = np.random.default_rng(CALIB_SEED)
    calib = {
        "input_ids": rng.integers(0, VOCAB, size=(N_CALIB, CALIB_LEN), dtype=np.int64),
        "attention_mask": np.ones((N_CALIB, CALIB_LEN), dtype=np.int64),
    }
    np.savez_compressed(OUT_DIR / "calib_tokens.npz", **calib)

    report: dict = {
        "generator": "models/build_transformers.py",
        "versions": {"torch": torch.__version__, "onnxscript": onnxscript_version,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "config": {"seed": SEED, "vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS,
                   "bert": {"heads": BERT_HEADS, "head_dim": HEAD_DIM, "ffn": BERT_FFN, "max_positions": MAX_POS},
                   "llama": {"heads": LLAMA_HEADS, "kv_heads": LLAMA_KV_HEADS, "head_dim": HEAD_DIM,
                             "ffn": LLAMA_FFN, "rope_theta": ROPE_THETA}},
        "exporters": {
            "ts": {"dynamo": False, "opset_version": TS_OPSET, "dynamic_axes": "batch, sequence",
                   "do_constant_folding": True},
            "dynamo": {"dynamo": True, "opset_version": DYNAMO_OPSET,
                       "dynamic_shapes": "torch.export.Dim('batch'), Dim('sequence') "
                                         f"(bert: max {MAX_POS}), Dim('past_sequence', min=0)"},
        },
        "data": {"calib_tokens.npz": {
            "keys": {"input_ids": [N_CALIB, CALIB_LEN], "attention_mask": [N_CALIB, CALIB_LEN]},
            "dtypes": {"input_ids": "int64", "attention_mask": "int64"},
            "how": f"uniform random token ids in [0,{VOCAB}), numpy default_rng({CALIB_SEED}); mask all ones",
            "for": ["bert_tiny.*", "bert_tiny_fusedqkv.*", "llama_tiny.*"]}},
        "models": {},
    }

    print("== bert_tiny", flush=True)
    build_bert("bert_tiny", False, calib, report)
    print("== bert_tiny_fusedqkv", flush=True)
    build_bert("bert_tiny_fusedqkv", True, calib, report)
    print("== llama_tiny / llama_tiny_kv", flush=True)
    build_llama(calib, report)

    with open(OUT_DIR / "manifest.json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    for p in sorted(OUT_DIR.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")
    print(f"wrote {OUT_DIR.relative_to(HERE.parent)}/manifest.json; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
