"""Issue 8: calibration sources (image folders of real photos, data-loader scripts), inspect,
OpenVINO parsing our output, packaging."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from builders import GraphBuilder, run
from onnxprune.api import calibration_statistics, prepare
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "logo", "camera")


def rgb_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    g = GraphBuilder([1, 3, 32, 32])
    c = g.op("Relu", [g.conv("x", rng.normal(size=(8, 3, 3, 3)).astype(np.float32), rng.normal(size=8).astype(np.float32), name="c1", pads=[1, 1, 1, 1])])
    c = g.op("MaxPool", [c], kernel_shape=[4, 4], strides=[4, 4])
    c = g.op("Relu", [g.conv(c, rng.normal(size=(6, 8, 3, 3)).astype(np.float32), None, name="c2", pads=[1, 1, 1, 1])])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    model = g.build(g.gemm(f, rng.normal(size=(6, 4)).astype(np.float32), None, name="fc"), ["N", 4])
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    return model


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Real photos from scikit-image written as PNG and JPEG files."""
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the real photos")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(PHOTOS):
        image = np.asarray(getattr(data, name)())
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        Image.fromarray(image).save(folder / f"{i:02d}_{name}.{'png' if i % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image; must be ignored")
    return folder


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def decode_like_a_user(folder: Path) -> np.ndarray:
    """What a user would write by hand: Pillow, RGB, bilinear resize to 32x32, /255, ImageNet norm, NCHW."""
    from PIL import Image

    arrays = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg")):
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32))
    x = (np.stack(arrays) / 255.0 - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def test_image_folder_gives_the_statistics_of_the_same_images_as_npz(photo_folder, tmp_path):
    model = rgb_cnn()
    npz = tmp_path / "photos.npz"
    np.savez(npz, x=decode_like_a_user(photo_folder))
    options = onnxprune.sources.ImageOptions(size=(32, 32), mean=MEAN, std=STD)
    from_folder = calibration_statistics(prepare(model, photo_folder, verify_samples=2, image_options=options))
    from_npz = calibration_statistics(prepare(model, npz, verify_samples=2))
    assert set(from_folder) == set(from_npz)
    for site in from_npz:
        assert from_folder[site].count == from_npz[site].count
        scale = np.abs(from_npz[site].gram).max()  # float32 decoding round-off, relative to the Gram's scale
        np.testing.assert_allclose(from_folder[site].gram, from_npz[site].gram, rtol=1e-6, atol=1e-8 * scale)


def test_cli_prunes_from_a_folder_of_photos(photo_folder, tmp_path):
    model_path = tmp_path / "cnn.onnx"
    onnx.save(rgb_cnn(), model_path)
    out = tmp_path / "cnn.pruned.onnx"
    args = [str(model_path), "--calib", str(photo_folder), "--input-size", "32,32", "--mean", ",".join(map(str, MEAN)),
            "--std", ",".join(map(str, STD)), "--ratio", "0.3", "--round-to", "1", "--verify-samples", "2", "-o", str(out), "-q"]
    assert main(args) == 0
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_data_loader_script(tmp_path):
    calib = np.load(MODELS / "data" / "fmnist_calib_flat.npz")["input"][:400]  # > 256 rows for the 256-unit layer
    np.save(tmp_path / "samples.npy", calib)
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np, pathlib\n"
        "def load_data():\n"
        "    x = np.load(pathlib.Path(__file__).with_name('samples.npy'))\n"
        "    for i in range(0, len(x), 50):\n"
        "        yield {'input': x[i:i + 50]}\n"
    )
    from_script = calibration_statistics(prepare(MODELS / "mlp.ts.onnx", f"{script}:load_data", verify_samples=40))
    from_arrays = calibration_statistics(prepare(MODELS / "mlp.ts.onnx", {"input": calib}, verify_samples=40))
    for site in from_arrays:
        np.testing.assert_allclose(from_script[site].gram, from_arrays[site].gram, rtol=1e-9)
    out = tmp_path / "mlp.pruned.onnx"
    assert main([str(MODELS / "mlp.ts.onnx"), "--data-loader-script", f"{script}:load_data", "-o", str(out), "--ratio", "0.3", "-q"]) == 0
    assert out.exists()


def test_inspect_lists_known_architectures(capsys):
    vgg = onnxprune.inspect_model(MODELS / "vgg_bn.ts.onnx")
    assert [s.units for s in vgg.spaces if not s.pinned] == [16, 16, 32, 32, 128]
    assert [s.pinned for s in vgg.spaces if s.pinned] == [["tensor 'logits' is a graph output"]]
    resnet = onnxprune.inspect_model(MODELS / "zoo" / "resnet18s.ts.onnx")
    streams = [s for s in resnet.spaces if len(s.producers) > 1]
    assert len(streams) == 4, "ResNet-18 has one residual stream per stage"
    assert all(len(s.producers) == 3 for s in streams), "stem/downsample conv + two blocks write each stream"
    mobilenet = onnxprune.inspect_model(MODELS / "zoo" / "mobilenetv2s.dynamo.onnx")
    depthwise_carriers = [s for s in mobilenet.spaces if any("Conv" in p for p in s.pass_through)]
    assert depthwise_carriers, "depthwise convs are pass-through ops of the expanded spaces"
    assert main(["inspect", str(MODELS / "mlp.ts.onnx"), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [s["units"] for s in parsed["spaces"]] == [256, 128, 10]


OPENVINO_CASES = [
    ("vgg_bn.ts.onnx", "data/fmnist_calib.npz"),
    ("mlp.dynamo.onnx", "data/fmnist_calib_flat.npz"),
    ("zoo/resnet18s.ts.onnx", "zoo/calib.npz"),
    ("zoo/mobilenetv2s.dynamo.onnx", "zoo/calib.npz"),
    ("zoo/densenets.ts.onnx", "zoo/calib.npz"),
    ("zoo/unets.ts.onnx", "zoo/calib64.npz"),
]


@pytest.mark.parametrize("name,calib", OPENVINO_CASES)
def test_openvino_runs_the_pruned_model_like_onnxruntime(name, calib, tmp_path):
    ov = pytest.importorskip("openvino", reason="openvino is an optional test dependency (pip install onnxprune[test])")
    model, _ = onnxprune.prune(MODELS / name, MODELS / calib, ratio=0.3, round_to=4)
    path = tmp_path / "pruned.onnx"
    onnx.save(model, path)
    x = np.load(MODELS / calib)["input"][:4]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = np.asarray(compiled(x)[0])
    expected = run(model, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_output_keeps_opset_ir_and_dynamic_batch():
    model, _ = onnxprune.prune(MODELS / "vgg_bn.dynamo.onnx", MODELS / "data" / "fmnist_calib.npz", ratio=0.3)
    original = onnx.load(MODELS / "vgg_bn.dynamo.onnx")
    assert model.ir_version == original.ir_version
    assert [(o.domain, o.version) for o in model.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == original.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    used = {i for n in model.graph.node for i in n.input}
    assert all(t.name in used for t in model.graph.initializer), "no leftover initializers"
    produced = {o for n in model.graph.node for o in n.output}
    assert all(v.name in produced for v in model.graph.value_info), "no stale value_info"


def test_cli_rounds_kept_units_to_multiples_of_8_by_default(tmp_path):
    out = tmp_path / "vgg.onnx"
    assert main([str(MODELS / "vgg_bn.ts.onnx"), "--calib", str(MODELS / "data" / "fmnist_calib.npz"), "-o", str(out), "--ratio", "0.4", "--report", str(tmp_path / "r.json"), "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(row["kept"] % 8 == 0 or row["kept"] == row["units"] for row in report["spaces"])


def test_python_m_and_version():
    result = subprocess.run([sys.executable, "-m", "onnxprune", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"onnxprune {onnxprune.__version__}"


@pytest.mark.slow
def test_wheel_has_console_script_and_extras(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)], check=True, timeout=300)
    wheel = next(tmp_path.glob("onnxprune-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith("METADATA"))
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        assert "onnxprune = onnxprune.cli:main" in archive.read(entry).decode()
        metadata = archive.read(meta).decode()
    assert all(f"Provides-Extra: {extra}" in metadata for extra in ("plot", "distributed", "test"))
    assert "onnxprune/__main__.py" in names


def test_inspect_says_when_the_model_does_not_run_at_the_default_sizes():
    """Dynamic dims default to 1; a model whose Reshape needs the real sequence length fails
    there, and inspect says so with the node and how to give the sizes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "target"], ["y"], name="pairs"),
        helper.make_node("NonZero", ["y"], ["where"]),  # a size only a run tells: the shapes are probed
        helper.make_node("Cast", ["where"], ["found"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 12]),
                               helper.make_tensor_value_info("found", TensorProto.FLOAT, [3, "K"])],
                              [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array([0, 2, 12], dtype=np.int64), "target")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    notes = onnxprune.inspect_model(model).notes
    assert len(notes) == 1 and "Reshape 'pairs' fails" in notes[0] and "--input-shapes" in notes[0], notes
    assert onnxprune.inspect_model(model, {"x": (1, 4, 4)}).notes == []


def test_inspect_probes_a_kv_cache_model_with_an_empty_past():
    """A KV-cache export's attention mask spans past + sequence: with every dynamic dim 1 the
    mask (1) contradicted past 1 + sequence 1 and the probe failed (every head read as pinned);
    the past length defaults to 0, an empty cache, as calibration runs it. An input named like a
    cache whose 0 breaks the probe gets 1 again."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxprune.inspect import default_input_shapes

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Concat", ["past_key_values.0.key", "x"], ["cat"], axis=1, name="cat"),
        helper.make_node("Shape", ["cat"], ["cat_shape"], end=2),
        helper.make_node("Reshape", ["attention_mask", "cat_shape"], ["mask"], name="mask_to_total"),  # total = past + sequence
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["cat", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "w"], ["y"], name="proj"),
        helper.make_node("NonZero", ["y"], ["where"]),  # a size only a run tells: the shapes are probed
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "past", 4]),
              helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "total", 6]),
               helper.make_tensor_value_info("where", TensorProto.INT64, [3, "K"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert default_input_shapes(model) == {"x": (1, 1, 4), "past_key_values.0.key": (1, 0, 4), "attention_mask": (1, 1)}
    assert onnxprune.inspect_model(model).notes == []
    assert "Reshape 'mask_to_total" in onnxprune.inspect_model(model, {"past_key_values.0.key": (1, 1, 4)}).notes[0]
    frames = helper.make_graph(  # an input named like a cache that is none: its first frame is read, so 0 fails, 1 is kept
        [helper.make_node("Gather", ["past_frames", "zero"], ["first"], axis=1), helper.make_node("MatMul", ["first", "w"], ["y"]),
         helper.make_node("NonZero", ["y"], ["where"])], "g",
        [helper.make_tensor_value_info("past_frames", TensorProto.FLOAT, ["batch", "frames", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6]), helper.make_tensor_value_info("where", TensorProto.INT64, [2, "K"])],
        [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w"), numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")])
    report = onnxprune.inspect_model(helper.make_model(frames, opset_imports=[helper.make_opsetid("", 17)]))
    assert report.input_shapes["past_frames"] == [1, 1, 4] and report.notes == []
