"""Add Keras (NHWC) models to the reference zoo, converted with tf2onnx (issue 14).

TensorFlow is not a dependency of onnxprune; run this in its own environment::

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    /tmp/tfenv/bin/python models/build_zoo_keras.py

Writes into ``models/zoo/`` (and merges into ``manifest.json``):

* ``<name>.tf2onnx.onnx``       - tf2onnx, opset 17, its default optimiser (BN folded into the
  Conv where it can be, Transposes pushed out to the graph input)
* ``<name>.tf2onnx_noopt.onnx`` - tf2onnx without its optimiser: every Conv2D wrapped in
  Transposes (NHWC -> NCHW -> Conv -> NHWC), BatchNorm as Mul/Add on the last axis, Dense on
  3-D/4-D tensors as Tensordot (Reshape [-1, C] -> MatMul -> Reshape, int32 shapes from Shape)
* ``calib_nhwc.npz`` - key ``input``: ``calib.npz`` transposed to [64, 32, 32, 3]

Models (random seeded weights, BatchNorm with random statistics, inference mode):

* ``keras_cnn``   Conv-BN-ReLU stem (stride 2), a residual Conv-ReLU-BN (BN after the ReLU: not
  foldable), DepthwiseConv2D, a channel-last Dense on the NHWC map, MaxPool, Conv-ReLU,
  GlobalAveragePooling2D, Dense-ReLU, Dense(10)
* ``keras_crnn``  an OCR-style CRNN: conv front end, channels-last column sequence, Dense,
  Bidirectional LSTM (an ONNX LSTM) and Bidirectional GRU (a Loop per direction), Dense(11)
  per step (output [batch, 16, 11]); tf2onnx with its optimiser only (without it, tf2onnx 1.17
  writes an invalid node for the GRU)
* ``keras_mixer`` Conv stem to 8x8x16 tokens, a channel-last self-attention block (Dense q/k/v,
  4 heads via reshape/transpose, softmax, Dense out, residual) and a tanh-GELU MLP block (residual),
  GlobalAveragePooling1D, Dense(10)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
from tensorflow import keras  # noqa: E402
from tf2onnx import tf_loader  # noqa: E402
from tf2onnx.convert import _convert_common, tensor_names_from_structed  # noqa: E402

ZOO = Path(__file__).resolve().parent / "zoo"
OPSET = 17
L = keras.layers


def keras_cnn() -> keras.Model:
    inp = keras.Input((32, 32, 3), name="input")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)))
    y = L.BatchNormalization()(L.ReLU()(L.Conv2D(16, 3, padding="same", bias_initializer="random_normal")(x)))
    x = L.Add()([x, y])
    x = L.DepthwiseConv2D(3, padding="same", bias_initializer="random_normal")(x)
    x = L.Dense(24, activation="relu", bias_initializer="random_normal")(x)  # channel-last Dense on NHWC
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(32, 3, padding="same", activation="relu", bias_initializer="random_normal")(x)
    x = L.Dense(32, activation="relu", bias_initializer="random_normal")(L.GlobalAveragePooling2D()(x))
    return keras.Model(inp, L.Dense(10, bias_initializer="random_normal")(x))


class Attention(L.Layer):
    """Multi-head self-attention written with reshape/transpose/matmul (what tf2onnx keeps as
    plain ops; Keras' MultiHeadAttention would become Einsum)."""

    def __init__(self, width: int, heads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads, self.d = heads, width // heads
        self.q, self.k, self.v, self.o = (L.Dense(width, bias_initializer="random_normal") for _ in range(4))

    def split(self, z):
        return tf.transpose(tf.reshape(z, (-1, z.shape[1], self.heads, self.d)), (0, 2, 1, 3))

    def call(self, t):
        q, k, v = self.split(self.q(t)), self.split(self.k(t)), self.split(self.v(t))
        att = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / float(np.sqrt(self.d)), axis=-1)
        y = tf.transpose(tf.matmul(att, v), (0, 2, 1, 3))
        return self.o(tf.reshape(y, (-1, t.shape[1], self.heads * self.d)))


def keras_mixer() -> keras.Model:
    inp = keras.Input((32, 32, 3), name="input")
    x = L.Conv2D(16, 3, strides=4, padding="same", activation="relu", bias_initializer="random_normal")(inp)
    t = L.Reshape((64, 16))(x)
    t = L.Add()([t, Attention(16, 4)(t)])
    h = L.Dense(32, bias_initializer="random_normal")(t)
    h = L.Activation(lambda z: keras.activations.gelu(z, approximate=True))(h)  # exact GELU needs Erfc (no ONNX op)
    t = L.Add()([t, L.Dense(16, bias_initializer="random_normal")(h)])
    return keras.Model(inp, L.Dense(10, bias_initializer="random_normal")(L.GlobalAveragePooling1D()(t)))


def keras_crnn() -> keras.Model:
    """An OCR-style CRNN: conv front end, the columns as a channels-last sequence (Permute +
    Reshape: 8 heights x 16 channels per step), Dense, a bidirectional LSTM (tf2onnx: one ONNX
    LSTM, its directions Sliced off and Concatenated), a bidirectional GRU (tf2onnx: a Loop per
    direction whose body reads the sequence from the enclosing graph), per-step Dense(11)."""
    inp = keras.Input((32, 32, 3), name="input")
    x = L.MaxPooling2D()(L.Conv2D(16, 3, padding="same", activation="relu", bias_initializer="random_normal")(inp))
    x = L.MaxPooling2D((2, 1))(L.Conv2D(16, 3, padding="same", activation="relu", bias_initializer="random_normal")(x))
    x = L.Reshape((16, 8 * 16))(L.Permute((2, 1, 3))(x))
    x = L.Dense(32, activation="relu", bias_initializer="random_normal")(x)
    x = L.Bidirectional(L.LSTM(24, return_sequences=True))(x)
    x = L.Bidirectional(L.GRU(16, return_sequences=True))(x)
    return keras.Model(inp, L.Dense(11, bias_initializer="random_normal")(x))


MODELS = {"keras_cnn": keras_cnn, "keras_mixer": keras_mixer, "keras_crnn": keras_crnn}
BOTH = (("tf2onnx", True), ("tf2onnx_noopt", False))
# without its optimiser tf2onnx 1.17 writes the GRU's TensorListFromTensor as an invalid Identity
KINDS = {"keras_cnn": BOTH, "keras_mixer": BOTH, "keras_crnn": BOTH[:1]}


def randomize_bn(model: keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm parameters and statistics, as the torch zoo models have."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])


def convert(model: keras.Model, path: Path, optimise: bool) -> None:
    """tf2onnx of the inference function, input `input` [batch, 32, 32, 3], output `output`."""
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="input"),)
    function = tf.function(lambda x: {"output": model(x, training=False)}, input_signature=spec)
    concrete = function.get_concrete_function(*spec)
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.dtypes.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.dtypes.resource]
    frozen = tf_loader.from_function(concrete, inputs, outputs)
    _convert_common(frozen, name=concrete.name, continue_on_error=True, opset=OPSET, input_names=inputs, output_names=outputs,
                    tensors_to_rename=tensor_names_from_structed(concrete, inputs, outputs), output_path=str(path),
                    optimizers=None if optimise else {})


def describe(path: Path, reference: np.ndarray, calib: np.ndarray, optimise: bool) -> dict:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = float(np.abs(session.run(None, {"input": calib[:2]})[0] - reference).max())
    assert diff < 1e-4 * max(1.0, float(np.abs(reference).max())), diff
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "file": path.name, "bytes": path.stat().st_size, "exporter": f"tf2onnx {tf2onnx.__version__}" + ("" if optimise else " (no optimiser)"),
        "opset": OPSET, "input_shape": ["batch", 32, 32, 3], "calib": "calib_nhwc.npz", "layout": "NHWC",
        "max_abs_diff_vs_keras_batch2": diff, "op_counts": dict(sorted(ops.items())),
    }


def main() -> None:
    keras.utils.set_random_seed(0)
    calib = np.ascontiguousarray(np.load(ZOO / "calib.npz")["input"].transpose(0, 2, 3, 1))
    np.savez_compressed(ZOO / "calib_nhwc.npz", input=calib)
    manifest_path = ZOO / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"].update({"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__})
    manifest["calibration"]["calib_nhwc.npz"] = {"key": "input", "shape": list(calib.shape), "dtype": "float32",
                                                 "how": "calib.npz transposed to NHWC (the same samples)"}
    for seed, (name, factory) in enumerate(MODELS.items()):
        keras.utils.set_random_seed(seed)
        model = factory()
        randomize_bn(model, np.random.default_rng(100 + seed))
        reference = model(calib[:2], training=False).numpy()
        files = []
        for kind, optimise in KINDS[name]:
            path = ZOO / f"{name}.{kind}.onnx"
            convert(model, path, optimise)
            manifest["files"][path.name] = {"model": name, **describe(path, reference, calib, optimise)}
            files.append(path.name)
            print(f"{path.name}: {path.stat().st_size} bytes", flush=True)
        manifest["models"][name] = {"framework": f"keras {keras.__version__}", "param_count": int(model.count_params()),
                                    "input_shape": ["batch", 32, 32, 3], "calib": "calib_nhwc.npz", "files": files}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
