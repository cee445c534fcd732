"""Pure-NumPy loader for the Debian ``dataset-fashion-mnist`` idx files.

No torch dependency.  Files are looked up in ``/usr/share/datasets/fashion-mnist``
(override with the ``FASHION_MNIST_DIR`` environment variable or the ``root``
argument); both gzipped (``*.gz``) and uncompressed idx files are accepted.

Images are returned as float32 ``[N, 1, 28, 28]`` normalised as
``(x / 255 - MEAN) / STD`` and labels as int64 ``[N]``.

Deterministic subsets:

* :func:`calibration_indices` / :func:`calibration_split` choose images from the
  *train* split (used to calibrate pruning),
* :func:`heldout_test_indices` / :func:`heldout_test_split` choose images from the *test* split.

Because they draw from different splits the two are disjoint by construction.
(The held-out helpers deliberately do not start with ``test_`` so pytest never
collects them when a test module imports them.)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

MEAN = 0.2860
STD = 0.3530

N_TRAIN = 60_000
N_TEST = 10_000

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# Seeds used for the committed data files in models/data/.
CALIB_SEED = 0
TEST_SEED = 1


def data_dir(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get("FASHION_MNIST_DIR")
    return Path(env) if env else DEFAULT_DIR


def _find(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        p = folder / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in folder '{folder}'. "
        f"Install the Debian package with:  {APT_HINT}  "
        f"(or set FASHION_MNIST_DIR to a folder holding the idx files)."
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data, got {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist_raw(split: str, root=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 28, 28]`` and uint8 labels ``[N]``."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = data_dir(root)
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find(folder, img_stem))
    labels = _read_idx(_find(folder, lbl_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"unexpected image array shape {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels shape {labels.shape} does not match images {images.shape}")
    return images, labels


def normalize(images_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> normalised float32 ``[N, 1, 28, 28]``."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return x.reshape(-1, 1, 28, 28).astype(np.float32, copy=False)


def load_fashion_mnist(split: str, root=None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: float32 ``[N,1,28,28]`` normalised, int64 ``[N]``.

    ``split`` is ``"train"`` (60000 images) or ``"test"`` (10000 images).
    """
    images, labels = load_fashion_mnist_raw(split, root)
    return normalize(images), labels.astype(np.int64)


def _choose(total: int, n: int, seed: int) -> np.ndarray:
    if not 0 < n <= total:
        raise ValueError(f"n must be in 1..{total}, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=n, replace=False)).astype(np.int64)


def calibration_indices(n: int = 512, seed: int = CALIB_SEED) -> np.ndarray:
    """Sorted, seeded indices into the *train* split."""
    return _choose(N_TRAIN, n, seed)


def heldout_test_indices(n: int = 1000, seed: int = TEST_SEED) -> np.ndarray:
    """Sorted, seeded indices into the *test* split."""
    return _choose(N_TEST, n, seed)


def calibration_split(n: int = 512, seed: int = CALIB_SEED, root=None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded images (and labels) from the *train* split."""
    x, y = load_fashion_mnist("train", root)
    idx = calibration_indices(n, seed)
    return x[idx], y[idx]


def heldout_test_split(n: int = 1000, seed: int = TEST_SEED, root=None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded images and labels from the *test* split."""
    x, y = load_fashion_mnist("test", root)
    idx = heldout_test_indices(n, seed)
    return x[idx], y[idx]


if __name__ == "__main__":  # pragma: no cover - quick sanity check
    for s in ("train", "test"):
        xs, ys = load_fashion_mnist(s)
        print(s, xs.shape, xs.dtype, float(xs.mean()), float(xs.std()), ys.shape, ys.dtype, np.bincount(ys))
