"""Build a tiny torchvision-style ViT whose attention is ``nn.MultiheadAttention``.

Rebuild (CPU only, a few seconds)::

    pip install torch==2.13.0 onnxscript onnx onnxruntime
    python models/build_vit_mha.py

nn.MultiheadAttention (torchvision's ViT, nn.TransformerEncoderLayer, CLIP, DETR) exports its
packed in-projection as one MatMul to 3E features, ``unflatten(-1, (3, E))`` then an
Unsqueeze / Transpose / Squeeze and a Gather per part (q, k, v), and folds the heads into the
batch axis, ``view(S, B * H, d)``, before viewing them back as [B, H, S, d]. Writes, into
``models/transformers/``:

* ``vit_mha.ts.onnx``     - TorchScript exporter (``dynamo=False``), opset 17, dynamic batch
* ``vit_mha.dynamo.onnx`` - torch.export exporter (``dynamo=True``), opset 18, dynamic batch
* ``vit_mha_calib.npz``   - ``images`` float32 [48, 3, 16, 16], N(0, 1), seed 1234

Model: 4x4 patches of a 16x16 image (Conv 3 -> 32, stride 4: 16 tokens), a class token, learnt
position embeddings, 2 pre-norm encoder layers (nn.MultiheadAttention(32, 4 heads,
batch_first=True), MLP 32 -> 64 -> 32 with GELU), final LayerNorm, a Linear head on the class
token to 10 logits. Random seeded weights; in layer 0, head 3's q, k and v projections copy
head 1's, so head 3's output equals head 1's (a planted redundant head). Both files are checked
against torch at batch 1 and 3.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

OUT_DIR = Path(__file__).resolve().parent / "transformers"
SEED, WIDTH, HEADS, LAYERS, IMAGE, PATCH = 1234, 32, 4, 2, 16, 4


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.self_attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.class_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.pos_embedding = nn.Parameter(0.5 * torch.randn(1, (IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.layers = nn.Sequential(*[EncoderLayer() for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


@torch.no_grad()
def plant_duplicate_head(attention: nn.MultiheadAttention, copy: int, of: int) -> None:
    """Head `copy` reads exactly what head `of` reads (q, k and v rows and biases)."""
    d = WIDTH // HEADS
    for part in range(3):
        rows = slice(part * WIDTH + copy * d, part * WIDTH + (copy + 1) * d)
        source = slice(part * WIDTH + of * d, part * WIDTH + (of + 1) * d)
        attention.in_proj_weight[rows] = attention.in_proj_weight[source]
        attention.in_proj_bias[rows] = attention.in_proj_bias[source]


def export(model: nn.Module, example: torch.Tensor, path: Path, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                                        external_data=False)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def main() -> None:
    torch.manual_seed(SEED)
    model = TinyViT().eval()
    plant_duplicate_head(model.layers[0].self_attention, copy=3, of=1)
    calib = np.random.default_rng(SEED).normal(size=(48, 3, IMAGE, IMAGE)).astype(np.float32)
    np.savez(OUT_DIR / "vit_mha_calib.npz", images=calib)
    for kind in ("ts", "dynamo"):
        path = OUT_DIR / f"vit_mha.{kind}.onnx"
        export(model, torch.from_numpy(calib[:2]), path, dynamo=kind == "dynamo")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            x = calib[:batch]
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
            diff = float(np.abs(session.run(None, {"images": x})[0] - expected).max())
            assert diff < 1e-4, (path.name, batch, diff)
        print(f"{path.name}: {path.stat().st_size} bytes, matches torch at batch 1 and 3")


if __name__ == "__main__":
    main()
