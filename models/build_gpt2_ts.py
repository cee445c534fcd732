"""Build a tiny GPT-2 (random seeded weights) exported by TorchScript, for onnxprune tests.

GPT-2's Conv1D layers export as Gemm on the flattened tokens (``addmm``), the attention's
fused q/k/v projection as one Gemm whose 192-wide bias covers every head; the dynamo exporter
writes MatMul + Add instead. Rebuild (CPU, seconds)::

    pip install torch==2.13.0 transformers
    python models/build_gpt2_ts.py

Writes ``models/transformers/gpt2_tiny.ts.onnx`` (vocab 100, hidden 64, 2 layers, 4 heads,
FFN 256, opset 14, dynamic batch and sequence) and ``gpt2_tiny_o13.ts.onnx``, the same at
opset 13 (where onnx's shape inference loses a Reshape's shape and the Shape vectors after it);
calibrate them with ``calib_tokens.npz``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import transformers as hf

FOLDER = Path(__file__).resolve().parent / "transformers"
OPSETS = {"gpt2_tiny.ts.onnx": 14, "gpt2_tiny_o13.ts.onnx": 13}


class LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


def main() -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = hf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = hf.GPT2Model._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (2, 16))
    for name, opset in OPSETS.items():
        out = FOLDER / name
        torch.onnx.export(LastHidden(model), (ids, torch.ones_like(ids)), str(out), dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
        print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
