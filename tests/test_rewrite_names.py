"""The names the rewrite gives (bias Adds after MatMuls without a bias, their constants) never
collide with the model's own names or with each other, even where the model already uses the
names the rewrite would pick first (`ConstantEdits._fresh_name` builds its set of names once)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from builders import run
from onnxprune.graph import SUFFIX

WIDTHS = (12, 16, 16, 16, 4)


def matmul_chain_with_taken_names() -> onnx.ModelProto:
    """(MatMul -> Relu) x 3 -> MatMul, no biases, after an input scaling whose constants and
    node carry the names the rewrite would give first to the bias Add after mm1."""
    rng = np.random.default_rng(3)
    taken = [f"h1{SUFFIX}_nobias", f"h1{SUFFIX}_bias"]
    weights = [numpy_helper.from_array(np.zeros(WIDTHS[0], np.float32), taken[0]),
               numpy_helper.from_array(np.ones(WIDTHS[0], np.float32), taken[1])]
    nodes = [helper.make_node("Add", ["x", taken[0]], ["shifted"], name=f"mm1{SUFFIX}_bias_add"),
             helper.make_node("Mul", ["shifted", taken[1]], ["scaled"], name="scale")]
    # two branches whose sums meet in MatMuls of one shared weight: each pruned branch needs its
    # own edited copy of it, two new names from the same base
    shared = numpy_helper.from_array((rng.standard_normal((WIDTHS[1], WIDTHS[0])) / 4).astype(np.float32), "w_shared")
    weights.append(shared)
    for branch in "ab":
        w = numpy_helper.from_array((rng.standard_normal((WIDTHS[0], WIDTHS[1])) / 4).astype(np.float32), f"w_{branch}")
        weights.append(w)
        nodes += [helper.make_node("MatMul", ["scaled", w.name], [f"{branch}0"], name=f"mm_{branch}"),
                  helper.make_node("Relu", [f"{branch}0"], [f"{branch}1"], name=f"relu_{branch}"),
                  helper.make_node("MatMul", [f"{branch}1", shared.name], [f"{branch}2"], name=f"back_{branch}")]
    nodes.append(helper.make_node("Add", ["a2", "b2"], ["joined"], name="join"))
    x = "joined"
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        w = numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32), f"w{i}")
        weights.append(w)
        nodes.append(helper.make_node("MatMul", [x, w.name], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
        if i < len(WIDTHS) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "names", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTHS[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", WIDTHS[-1]])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_new_names_avoid_the_models_names_and_each_other() -> None:
    model = matmul_chain_with_taken_names()
    x = np.random.default_rng(0).standard_normal((256, WIDTHS[0])).astype(np.float32)
    pruned, report = onnxprune.prune(model, {"x": x}, ratio=0.4, sequential=False)
    assert sum(s.units - s.kept for s in report.spaces) > 0
    names = [n.name for n in pruned.graph.node]
    # the bias Add after mm1 could not take the name the model already gives another node
    assert f"mm1{SUFFIX}_bias_add" in names and any(n.startswith(f"mm1{SUFFIX}_bias_add") and n != f"mm1{SUFFIX}_bias_add" for n in names), names
    assert pruned.graph.output[0].name == model.graph.output[0].name
    copies = [t for t in pruned.graph.initializer if t.name.startswith(f"w_shared{SUFFIX}")]
    assert len(copies) == 2, [t.name for t in pruned.graph.initializer]  # the shared weight, edited once per branch
    outputs = [o for n in pruned.graph.node for o in n.output]
    constants = [t.name for t in pruned.graph.initializer]
    assert len(set(outputs)) == len(outputs) and len(set(names)) == len(names) and len(set(constants)) == len(constants)
    assert not set(outputs) & set(constants)
    onnx.checker.check_model(pruned, full_check=True)
    # the model's own constants are still there, untouched, and the pruned model runs
    kept = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    assert np.array_equal(kept[f"h1{SUFFIX}_nobias"], np.zeros(WIDTHS[0])) and np.array_equal(kept[f"h1{SUFFIX}_bias"], np.ones(WIDTHS[0]))
    out = run(pruned, x[:8])
    assert out.shape == (8, WIDTHS[-1]) and np.isfinite(out).all()
