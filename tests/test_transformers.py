"""Issue 4: FFN neurons and attention heads (MHA, GQA) in transformer exports from both torch
exporters; planted duplicates are removed exactly; KV-cache models keep generating."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.graph import GraphIndex

TRANSFORMERS = Path(__file__).resolve().parents[1] / "models" / "transformers"
CALIB = dict(np.load(TRANSFORMERS / "calib_tokens.npz"))
KV_CALIB = dict(np.load(TRANSFORMERS / "calib_tokens_kv.npz"))


def load(name: str) -> onnx.ModelProto:
    return onnx.load(TRANSFORMERS / f"{name}.onnx")


def feeds_for(model: onnx.ModelProto, data: dict, rows=slice(0, 3), seq: int | None = None) -> dict:
    names = {i.name for i in model.graph.input}
    out = {}
    for key, value in data.items():
        if key in names:
            value = value[rows]
            if seq is not None and key in ("input_ids", "attention_mask"):
                value = value[:, :seq]
            out[key] = value
    return out


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def spaces(model: onnx.ModelProto, data: dict):
    shapes = {k: (1, *v.shape[1:]) for k, v in feeds_for(model, data).items()}
    return onnxprune.inspect_model(model, shapes).spaces


def copy_columns(model: onnx.ModelProto, producer: str, width: int, source: int, target: int) -> None:
    """Output columns [target*width, ...) of a MatMul producer (and its bias Add) := those of `source`."""
    index = GraphIndex(model, shapes={})
    node = index.node(producer)
    names = [node.input[1]]
    uses = index.uses.get(node.output[0], [])
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        names += [i for i in uses[0].node.input if i in index.initializer_names]
    tensors = {t.name: t for t in model.graph.initializer}
    for name in names:
        value = numpy_helper.to_array(tensors[name]).copy()
        value[..., target * width:(target + 1) * width] = value[..., source * width:(source + 1) * width]
        tensors[name].CopyFrom(numpy_helper.from_array(value, name))


def plant_duplicate_unit(model: onnx.ModelProto, space, source: int = 0, target: int | None = None) -> int:
    """Make unit `target` of a space an exact copy of unit `source` in every producer."""
    target = space.units - 1 if target is None else target
    index = GraphIndex(model, shapes={})
    for producer in space.producers:
        columns = index.const(index.node(producer).input[1]).shape[1]
        copy_columns(model, producer, columns // space.units, source, target)
    return target


def head_spaces(found) -> list:
    """Per layer, the space of its 4 query heads (BERT: with their keys and values)."""
    return [s for s in found if not s.pinned and s.derived_from is None and s.units == 4]


def plant_redundant_group(model: onnx.ModelProto, found) -> tuple:
    """Layer 0: BERT's head 3 := head 0. With grouped-query attention (2 KV heads of 2 query
    heads) the o_proj rows of KV group 1's query heads are zeroed: both heads carry nothing, so
    both go, and their KV head with them (the k and v spaces derived from the query heads).
    Returns (query-head space, layer 0's KV-head spaces)."""
    heads = head_spaces(found)[0]
    kv = [s for s in found if s.derived_from is not None][:2]  # layer 0's k and v
    if not kv:
        plant_duplicate_unit(model, heads)
        return heads, kv
    silence_heads(model, heads, [2, 3])
    return heads, kv


def silence_heads(model: onnx.ModelProto, heads, which: list[int]) -> None:
    """Zero the o_proj rows (MatMul [heads x d_head, hidden]) that read these query heads."""
    index = GraphIndex(model, shapes={})
    weight = next(t for t in model.graph.initializer if t.name == index.node(heads.consumers[0]).input[1])
    value = numpy_helper.to_array(weight).copy()
    d_head = value.shape[0] // heads.units
    for head in which:
        value[head * d_head:(head + 1) * d_head] = 0
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))


BOTH = ["bert_tiny.ts", "bert_tiny.dynamo", "llama_tiny.dynamo", "llama_tiny.ts"]


@pytest.mark.parametrize("name", BOTH)
def test_ffn_spaces_are_found_and_the_hidden_stream_is_pinned(name):
    found = spaces(load(name), CALIB)
    ffn = [s for s in found if not s.pinned and s.units in (128, 256)]
    assert len(ffn) == 2, "one FFN space per layer"
    if name.startswith("llama"):
        assert all(len(s.producers) == 2 for s in ffn), "SwiGLU couples gate and up projections"
    hidden = [s for s in found if s.units == 64]
    assert hidden and all(s.pinned for s in hidden)
    assert any("LayerNormalization" in r or "ReduceMean" in r or "Gather" in r for s in hidden for r in s.pinned)


@pytest.mark.parametrize("name", BOTH)
def test_attention_heads_are_spaces_of_whole_heads(name):
    found = spaces(load(name), CALIB)
    heads, kv = head_spaces(found), [s for s in found if s.derived_from is not None]
    assert len(heads) == 2, "one space of 4 query heads per layer"
    if name.startswith("llama"):  # GQA: 2 KV heads of 2 query heads; k and v go with their query heads
        assert all(s.producers == [s.producers[0]] for s in heads)
        assert len(kv) == 4 and all(s.units == 2 and not s.pinned and "gather" in s.derived_from for s in kv)
    else:
        assert all(len(s.producers) == 3 for s in heads) and not kv


@pytest.mark.parametrize("name", BOTH)
def test_planted_duplicate_ffn_neurons_are_removed_exactly(name):
    model = load(name)
    ffn = next(s for s in spaces(model, CALIB) if not s.pinned and s.units in (128, 256))
    for source, target in ((0, 7), (3, 11), (5, 20)):
        plant_duplicate_unit(model, ffn, source, target)
    pruned, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), tolerance=1e-5)
    row = next(r for r in report.spaces if r.name == ffn.name)
    assert row.units - row.kept == 3
    feeds = feeds_for(model, CALIB, slice(0, 4), seq=20)  # fresh length
    assert relative(run(model, feeds)[0], run(pruned, feeds)[0]) < 1e-4


@pytest.mark.parametrize("name", BOTH)
def test_planted_duplicate_head_is_removed_exactly(name):
    """BERT: a copied head goes; GQA: a silent KV group's query heads go, and its KV head with them."""
    model = load(name)
    heads, kv = plant_redundant_group(model, spaces(model, CALIB))
    pruned, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), tolerance=1e-5)
    rows = {r.name: (r.kept, r.units) for r in report.spaces}
    assert rows[heads.name] == ((2, 4) if kv else (3, 4))
    assert [rows[s.name] for s in kv] == [(1, 2)] * len(kv)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model, CALIB, slice(0, 4), seq=20)
    assert relative(run(model, feeds)[0], run(pruned, feeds)[0]) < 1e-4
    assert report.macs_after < report.macs_before


@pytest.mark.parametrize("name", BOTH)
def test_ratio_prunes_and_keeps_the_graph_valid(name):
    model = load(name)
    pruned, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), ratio=0.3)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model, CALIB, slice(0, 2), seq=11)
    assert run(pruned, feeds)[0].shape == run(model, feeds)[0].shape
    assert report.units_after < report.units_before
    same, _ = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), ratio=0.0)
    assert np.array_equal(run(model, feeds)[0], run(same, feeds)[0])


def generate(model: onnx.ModelProto, first: dict, steps: int = 2) -> list[np.ndarray]:
    """Greedy decoding: feed the prompt with the given past, then each argmax token with the presents."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds, logits = dict(first), []
    for _ in range(steps):
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        logits.append(outputs["logits"])
        token = outputs["logits"][:, -1:].argmax(-1).astype(np.int64)
        feeds = {"input_ids": token}
        feeds.update({k.replace("present", "past"): v for k, v in outputs.items() if k.startswith("present")})
    return logits


def kv_data_with_duplicate_group(data: dict) -> dict:
    """Past keys/values whose KV group 1 equals group 0 (consistent with the planted weights)."""
    data = {k: v.copy() for k, v in data.items()}
    for key, value in data.items():
        if key.startswith("past"):
            value[:, 1] = value[:, 0]
    return data


def test_kv_cache_model_at_ratio_0_generates_like_the_original():
    model = load("llama_tiny_kv.dynamo")
    pruned, _ = onnxprune.prune(model, KV_CALIB, ratio=0.0)
    first = {k: v[:2] for k, v in KV_CALIB.items()}
    for a, b in zip(generate(model, first), generate(pruned, first), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["llama_tiny_kv.dynamo", "llama_tiny_kv.ts"])
def test_pruning_a_kv_group_shrinks_the_cache_io_and_generation_still_matches(name):
    model = load(name)
    data = kv_data_with_duplicate_group(KV_CALIB)
    _, kv = plant_redundant_group(model, spaces(model, data))
    assert kv, "grouped-query attention"
    pruned, report = onnxprune.prune(model, data, tolerance=1e-5)
    assert report.io_changes, "the report names the new cache shapes"
    assert all(shape[1] == 1 for shape in report.io_changes.values() if isinstance(shape[1], int))
    shapes = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in [*pruned.graph.input, *pruned.graph.output] if "past" in v.name or "present" in v.name}
    assert sorted(set(shapes.values())) in ([1], [1, 2])
    first = {k: v[:2] for k, v in data.items()}
    pruned_first = dict(first)
    for name, value in first.items():
        if name.startswith("past") and shapes.get(name) == 1:
            pruned_first[name] = value[:, :1]
    for a, b in zip(generate(model, first), generate(pruned, pruned_first), strict=True):
        assert relative(a, b) < 1e-4


def test_onnxruntime_fastgelu_is_a_pass_through_and_fused_attention_pins_clearly():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, bias, w2 = (rng.normal(size=s).astype(np.float32) for s in ((8, 16), (16,), (16, 4)))
    w1[:, 9], bias[9] = w1[:, 2], bias[2]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("FastGelu", ["h", "bias"], ["a"], domain="com.microsoft", name="gelu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="down")]
    inits = [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("bias", bias), ("w2", w2))]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    x = rng.normal(size=(200, 8)).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, tolerance=1e-5)
    assert (report.spaces[0].kept, report.spaces[0].units) == (15, 16)
    assert relative(run(model, {"x": x[:5]})[0], run(pruned, {"x": x[:5]})[0]) < 1e-4
    nodes[1] = helper.make_node("Attention", ["h", "bias"], ["a"], domain="com.microsoft", name="fused", num_heads=2)
    fused = helper.make_model(helper.make_graph(nodes, "attn", graph.input, graph.output, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    reasons = onnxprune.inspect_model(fused).spaces[0].pinned
    assert any("fused op Attention" in r for r in reasons)


def test_hidden_size_is_pinned_with_the_reason():
    found = spaces(load("bert_tiny.ts"), CALIB)
    hidden = [s for s in found if s.units == 64]
    assert any("not prunable by node pruning" in r for s in hidden for r in s.pinned)


@pytest.mark.parametrize("name", ["bert_tiny_fusedqkv.ts", "bert_tiny_fusedqkv.dynamo"])
def test_fused_qkv_heads_are_units_and_a_planted_duplicate_head_goes(name):
    model = load(name)
    heads = next(s for s in spaces(model, CALIB) if "qkv" in s.producers[0] or s.units == 4)
    assert heads.units == 4 and not heads.pinned, "q, k and v columns of a head are one unit"
    d_head, hidden = 16, 64
    for part in range(3):  # q, k, v blocks of the fused output: head 3 := head 0
        index = GraphIndex(model, shapes={})
        node = index.node(heads.producers[0])
        names = [node.input[1]] + [i for u in index.uses.get(node.output[0], []) if u.node.op_type == "Add" for i in u.node.input if i in index.initializer_names]
        tensors = {t.name: t for t in model.graph.initializer}
        for tensor_name in names:
            value = numpy_helper.to_array(tensors[tensor_name]).copy()
            start = part * hidden
            value[..., start + 3 * d_head:start + 4 * d_head] = value[..., start:start + d_head]
            tensors[tensor_name].CopyFrom(numpy_helper.from_array(value, tensor_name))
    pruned, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), tolerance=1e-5)
    row = next(r for r in report.spaces if r.name == heads.name)
    assert (row.kept, row.units) == (3, 4)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(model, CALIB, slice(0, 4), seq=20)
    assert relative(run(model, feeds)[0], run(pruned, feeds)[0]) < 1e-4
    fused = GraphIndex(pruned, shapes={}).node(heads.producers[0])
    weight = next(t for t in pruned.graph.initializer if t.name == fused.input[1])
    assert list(weight.dims) == [hidden, 3 * 3 * d_head], "three heads of q, k and v stay"


@pytest.mark.parametrize("name", ["bert_tiny.dynamo", "llama_tiny.dynamo"])
def test_round_to_counts_channels_so_whole_heads_are_not_rounded_away(name):
    """--round-to N keeps a multiple of N channels: a head of d_head channels (a multiple of N)
    is free to go, while N = 2 x d_head keeps heads in pairs."""
    from onnxprune.api import prepare
    from onnxprune.plan import unit_width

    model = load(name)
    heads = head_spaces(spaces(model, CALIB))[0]
    if name.startswith("llama"):  # a query head copied from another KV group would not be redundant: one that says nothing is
        silence_heads(model, heads, [3])
    else:
        plant_duplicate_unit(model, heads)
    space = next(s for s in prepare(model, feeds_for(model, CALIB, slice(None))).analysis.spaces if set(s.producers) == set(heads.producers))
    width = unit_width(space)
    assert width > 1 and heads.units % 2 == 0
    for round_to, kept in ((width, heads.units - 1), (2 * width, heads.units)):
        _, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), tolerance=1e-5, round_to=round_to)
        row = next(r for r in report.spaces if set(r.producers) == set(heads.producers))
        assert row.kept == kept, (round_to, row.kept)


def test_a_kv_head_stays_while_one_of_its_query_heads_does():
    """Grouped-query attention: of KV group 1's two query heads only head 3 says nothing; it goes
    alone and both KV heads stay (the k and v spaces are derived from the query heads)."""
    model = load("llama_tiny.dynamo")
    found = spaces(model, CALIB)
    heads, kv = head_spaces(found)[0], [s for s in found if s.derived_from is not None][:2]
    silence_heads(model, heads, [3])
    pruned, report = onnxprune.prune(model, feeds_for(model, CALIB, slice(None)), tolerance=1e-5)
    rows = {r.name: (r.kept, r.units) for r in report.spaces}
    assert rows[heads.name] == (3, 4) and [rows[s.name] for s in kv] == [(2, 2), (2, 2)]
    assert not report.io_changes
    assert f"`{kv[0].name}` (KV heads)" in report.markdown()
    feeds = feeds_for(model, CALIB, slice(0, 4), seq=20)
    assert relative(run(model, feeds)[0], run(pruned, feeds)[0]) < 1e-4


def test_gpt2_torchscript_fused_qkv_gemm_loses_heads_with_their_bias() -> None:
    """GPT-2 exported by TorchScript: the fused q/k/v projection is a Gemm whose bias spans all
    three projections (192 = 3 x 4 heads x 16); removing heads slices the bias with the weight
    (it was left whole, and onnxruntime refused the model)."""
    path = "models/transformers/gpt2_tiny.ts.onnx"  # python models/build_gpt2_ts.py
    calib = dict(np.load("models/transformers/calib_tokens.npz"))
    model, report = onnxprune.prune(path, calib, params=0.3, allocation="uniform", head_gain=1, seed=0)
    heads = [s for s in report.spaces if s.units == 4 and not s.pinned]
    assert heads and any(s.kept < s.units for s in heads)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and "c_attn" in n.name)
    weights = {t.name: t for t in model.graph.initializer}
    assert weights[gemm.input[1]].dims[1] == weights[gemm.input[2]].dims[0] < 192
    ids = calib["input_ids"][:4, :20]
    original = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    pruned = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    reference, got = original.run(None, feeds)[0], pruned.run(None, feeds)[0]
    assert got.shape == reference.shape and np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.8


def test_gpt2_at_opset_13_is_analysed_like_opset_14() -> None:
    """At opset 13 onnx's shape inference loses a Reshape's shape and the Shape vectors after it;
    the onnxruntime probe measures those integer vectors too, so the heads and FFN neurons are as
    prunable as at opset 14 (every space was pinned: "Shape reads the size of the units' axis")."""
    def prunable(path: str) -> list[tuple[str, int]]:
        return sorted((s.name, s.units) for s in onnxprune.inspect_model(path).spaces if not s.pinned)

    assert prunable("models/transformers/gpt2_tiny_o13.ts.onnx") == prunable("models/transformers/gpt2_tiny.ts.onnx") != []


def test_the_planner_counts_the_kv_heads_that_go_with_their_query_heads() -> None:
    """Removing every query head of a KV group removes its KV head (k and v projections): the
    planner's parameter count of a plan includes them, and equals the rewritten model's."""
    from onnxprune.api import calibration_statistics, prepare
    from onnxprune.cost import build_cost_model, count_params
    from onnxprune.plan import make_planner
    from onnxprune.rewrite import pruned_spaces, rewrite
    from onnxprune.score import score_space

    model, calib = onnx.load("models/transformers/llama3_gqa.dynamo.onnx"), dict(np.load("models/transformers/llama3_gqa_calib.npz"))
    prepared = prepare(model, calib, verify_samples=4)
    stats = calibration_statistics(prepared)
    analysis, index = prepared.analysis, prepared.index
    scores = {s.id: score_space(s, stats, index) for s in analysis.prunable}
    cost = build_cost_model(index, analysis, recovery=False)
    planner = make_planner(analysis, scores, cost)
    counts = {sid: len(sc.order) for sid, sc in scores.items()}
    queries = next(s for s in analysis.prunable if s.derived is None and any(d.derived.output in s.tensors for d in analysis.derived))
    counts[queries.id] = queries.n - 4  # 6 query heads, 3 KV groups of 2: at least one whole group goes
    plan = planner.plan_at(0.0, onnxprune.plan.Target("params", 0.1), counts)
    assert any(s.derived is not None for s, _ in pruned_spaces(analysis, plan))  # a KV head goes
    pruned = rewrite(prepared.original, analysis, plan, None, index.constants)
    actual = 1 - count_params(pruned) / count_params(prepared.original)
    predicted = planner.removed_with("params", counts)
    assert abs(predicted - actual) < 1e-6 * max(actual, 1e-9) + 1e-9
