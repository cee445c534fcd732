"""Export tiny random-weight Hugging Face architectures to ONNX for onnxprune coverage checks.

Run (CPU only, no network: every model is built from a config, nothing is downloaded)::

    pip install torch==2.13.0 transformers onnx onnxruntime onnxscript
    python models/build_zoo_hf.py [--out /tmp/hfzoo] [--only gpt2 vit ...]

The weights are random (``torch.manual_seed(0)`` before each model is built; linear weights of
std hidden**-0.5 where the config has ``initializer_range``; BatchNorm scales and shifts random,
its running statistics measured on random inputs so that deep conv nets' activations do not
vanish): the files test graph patterns, not accuracy. Every model is tiny (hidden 64, 2 layers,
4 heads, FFN 128, vocab 100; images 3x32x32 or 3x64x64; Whisper 16 mel bins x 32 frames), in
eval mode, with eager attention where the architecture has a choice, and is exported with the
TorchScript exporter (``dynamo=False``, opset 17) with a dynamic ``batch`` axis only.

Writes, into ``--out``:

* ``<name>.ts.onnx``     - one output ``last_hidden_state``: the base model's (no LM or
  classification head), the encoder's for ``t5_encoder`` and ``whisper_encoder``
* ``<name>.calib.npz``   - 64 random valid inputs keyed by the ONNX input names:
  ``input_ids`` int64 [64,16] (uniform < vocab), ``attention_mask`` int64 [64,16] (ones),
  ``pixel_values`` / ``input_features`` float32 N(0,1)

A model that fails to build, export or run in onnxruntime is skipped with the reason printed;
the rest are still written. The exit status is 1 if any model was skipped.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers as hf
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from zoo_common import build_each, calibrate_batchnorm, zoo_arguments

SEED = 0
CALIB_SEED = 1234
OPSET = 17
N_CALIB = 64
SEQ = 16
VOCAB = 100
HIDDEN = 64
LAYERS = 2
HEADS = 4
FFN = 128
MEL_BINS = 16
FRAMES = 32  # Whisper: 2 * max_source_positions

TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            max_position_embeddings=64)
DECODER = dict(TEXT, num_key_value_heads=2)  # GQA where the architecture has it
VIT = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, image_size=32, patch_size=8,
           num_channels=3)
STAGES = dict(num_channels=3, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1])


def base_model(config: hf.PretrainedConfig) -> torch.nn.Module:
    """A base model with eager attention and weights of std HIDDEN**-0.5 (HF's 0.02 would make
    every sublayer a small perturbation of the residual stream)."""
    if hasattr(config, "initializer_range"):
        config.initializer_range = HIDDEN**-0.5
    return hf.AutoModel.from_config(config, attn_implementation="eager")


def t5_encoder() -> torch.nn.Module:
    config = hf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                         feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return hf.T5EncoderModel._from_config(config, attn_implementation="eager")


def whisper_encoder() -> torch.nn.Module:
    config = hf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=MEL_BINS, d_model=HIDDEN, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
                              encoder_ffn_dim=FFN, max_source_positions=FRAMES // 2, init_std=HIDDEN**-0.5, decoder_layers=1,
                              decoder_attention_heads=HEADS, decoder_ffn_dim=FFN, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, decoder_start_token_id=1)
    return WhisperEncoder._from_config(config, attn_implementation="eager")


# name -> (model builder, input kind); kinds: "ids" input_ids only, "ids_mask" input_ids +
# attention_mask, "image32" / "image64" pixel_values [B,3,H,W], "audio" input_features [B,16,32]
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    "gpt2": (lambda: base_model(hf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64,
                                            bos_token_id=0, eos_token_id=0)), "ids_mask"),
    "opt": (lambda: base_model(hf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                                      word_embed_proj_dim=HIDDEN, max_position_embeddings=64)), "ids_mask"),
    "gpt_neox": (lambda: base_model(hf.GPTNeoXConfig(**TEXT)), "ids_mask"),
    "bloom": (lambda: base_model(hf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)), "ids_mask"),
    "qwen2": (lambda: base_model(hf.Qwen2Config(**DECODER)), "ids_mask"),
    "phi": (lambda: base_model(hf.PhiConfig(**TEXT)), "ids_mask"),
    "gemma": (lambda: base_model(hf.GemmaConfig(**DECODER, head_dim=HIDDEN // HEADS)), "ids_mask"),
    "mistral": (lambda: base_model(hf.MistralConfig(**DECODER, sliding_window=None)), "ids_mask"),
    "falcon": (lambda: base_model(hf.FalconConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            ffn_hidden_size=FFN)), "ids_mask"),
    "bert": (lambda: base_model(hf.BertConfig(**TEXT)), "ids_mask"),
    "distilbert": (lambda: base_model(hf.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                                    max_position_embeddings=64)), "ids_mask"),
    "roberta": (lambda: base_model(hf.RobertaConfig(**dict(TEXT, max_position_embeddings=SEQ + 2 + 8))), "ids_mask"),
    "vit": (lambda: base_model(hf.ViTConfig(**VIT)), "image32"),
    "deit": (lambda: base_model(hf.DeiTConfig(**VIT)), "image32"),
    "convnext": (lambda: base_model(hf.ConvNextConfig(layer_scale_init_value=1.0, **STAGES)), "image64"),
    "swin": (lambda: base_model(hf.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[1, 1], num_heads=[2, 4],
                                        window_size=4)), "image32"),
    "resnet": (lambda: base_model(hf.ResNetConfig(embedding_size=16, layer_type="bottleneck", **STAGES)), "image64"),
    "regnet": (lambda: base_model(hf.RegNetConfig(embedding_size=16, groups_width=8, **STAGES)), "image64"),
    "mobilenet_v2": (lambda: base_model(hf.MobileNetV2Config(image_size=64, depth_multiplier=0.35)), "image64"),
    "efficientnet": (lambda: base_model(hf.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320)),
                     "image64"),
    "mobilevit": (lambda: base_model(hf.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                                   num_attention_heads=HEADS)), "image64"),
    "segformer": (lambda: base_model(hf.SegformerConfig(num_channels=3, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64],
                                                  num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=64)), "image64"),
    "t5_encoder": (t5_encoder, "ids_mask"),
    "whisper_encoder": (whisper_encoder, "audio"),
}


class FirstOutput(torch.nn.Module):
    """Calls the model with keyword inputs and returns its first output as one tensor."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        return self.model(**dict(zip(self.names, inputs, strict=True)), **extra)[0]


def calibration(kind: str, n: int, seed: int = CALIB_SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind.startswith("ids"):
        data = {"input_ids": rng.integers(0, VOCAB, (n, SEQ), dtype=np.int64)}
        if kind == "ids_mask":
            data["attention_mask"] = np.ones((n, SEQ), dtype=np.int64)
        return data
    if kind.startswith("image"):
        size = int(kind.removeprefix("image"))
        return {"pixel_values": rng.standard_normal((n, 3, size, size), dtype=np.float32)}
    if kind == "audio":
        return {"input_features": rng.standard_normal((n, MEL_BINS, FRAMES), dtype=np.float32)}
    raise ValueError(f"unknown input kind {kind}")


def build(name: str, out_dir: Path) -> str:
    """Export one model; returns a one-line summary (raises on failure)."""
    builder, kind = ZOO[name]
    torch.manual_seed(SEED)
    model = builder().eval()
    calibrate_batchnorm(model, lambda seed: model(**{k: torch.from_numpy(v) for k, v in calibration(kind, 16, seed=SEED + seed).items()}))
    calib = calibration(kind, N_CALIB)
    names = list(calib)
    wrapper = FirstOutput(model, names).eval()
    example = tuple(torch.from_numpy(calib[k][:2]) for k in names)
    output = "last_hidden_state"
    path = out_dir / f"{name}.ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=OPSET, input_names=names, output_names=[output],
                          dynamic_axes={k: {0: "batch"} for k in [*names, output]})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: calib[k][:3] for k in names})[0]
    with torch.no_grad():
        want = wrapper(*(torch.from_numpy(calib[k][:3]) for k in names)).numpy()
    diff = float(np.abs(got - want).max())
    if not diff < 1e-3:
        raise RuntimeError(f"onnxruntime differs from torch by {diff:.3g}")
    np.savez(out_dir / f"{name}.calib.npz", **calib)
    params = sum(p.numel() for p in model.parameters())
    return f"{name}: {params:,} params, inputs {names}, output {output}{list(got.shape)}, max |ort - torch| {diff:.1e}"


def main(argv: list[str] | None = None) -> int:
    args = zoo_arguments(__doc__, list(ZOO), "/tmp/hfzoo", argv)
    return build_each(args.only or list(ZOO), lambda name: (build(name, args.out), []))

if __name__ == "__main__":
    sys.exit(main())
