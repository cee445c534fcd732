"""`onnxprune inspect`: what would be pruned, before any calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

from .analyse import CACHE_NAME, Space
from .calibrate import rows_per_sample
from .cost import build_cost_model, count_params
from .load import load_model
from .preparation import training_mode_ops, unanalysed_ops
from .report import print_lock_notes
from .tidy import shapes_and_index
from .unfuse import analyse_unfused


@dataclass
class SpaceInfo:
    """One space as the analysis sees it."""

    name: str
    units: int
    producers: list[str]
    consumers: list[str]
    pass_through: list[str]
    sites: list[str]
    macs: int
    pinned: list[str] = field(default_factory=list)
    samples_needed: int | None = None  # calibration samples for more rows than units at every site
    locked: int = 0  # units always kept (a multi-query KV head), and why
    lock_reasons: list[str] = field(default_factory=list)
    derived_from: str | None = None  # the Gather repeating these units (grouped-query KV heads): they go with its query heads


@dataclass
class InspectReport:
    """Prunable and pinned spaces, with params and MACs (symbolic dims taken as 1, a KV cache's past as 0)."""

    model: str
    params: int
    macs: int
    input_shapes: dict[str, list[int]]
    spaces: list[SpaceInfo]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(f"[bold]{self.model}[/bold]: {self.params:,} params, {self.macs:,} MACs per run at {_shapes_text(self.input_shapes)}")
        for note in self.notes:
            console.print(f"[yellow]note[/yellow]: {note}")
        prunable = Table(title="prunable spaces")
        for column in ("space (first producer)", "units", "producers", "consumers", "MACs", "samples needed"):
            prunable.add_column(column, justify="left" if column.startswith("space") else "right", overflow="fold")
        for space in self.spaces:
            if not space.pinned and space.derived_from is None:
                needed = "?" if space.samples_needed is None else str(space.samples_needed)
                prunable.add_row(space.name, str(space.units), str(len(space.producers)), str(len(space.consumers)), f"{space.macs:,}", needed)
        console.print(prunable)
        print_lock_notes(console, self.spaces)
        for space in self.spaces:
            if space.derived_from is not None and not space.pinned:
                console.print(f"'{space.name}': {space.units} KV heads, each removed with every query head that Gather '{space.derived_from}' repeats it for")
        needed = [s.samples_needed for s in self.spaces if not s.pinned and s.derived_from is None and s.samples_needed is not None]
        if needed:
            console.print(f"calibration: with at least {max(needed)} samples (plus the held-out ones) every prunable space sees "
                          "more rows than it has units; a space with fewer is not pruned")
        pinned = [s for s in self.spaces if s.pinned]
        if pinned:
            table = Table(title="pinned spaces (never pruned)")
            for column in ("space", "units", "reason"):
                table.add_column(column, overflow="fold")
            for space in pinned:
                table.add_row(space.name, str(space.units), "; ".join(space.pinned))
            console.print(table)


def samples_needed(space: Space, shapes: dict) -> int | None:
    """Calibration samples (besides the held-out ones) for more rows than units at every site
    (`undersampled.pin_undersampled`); a pooled site counts its pooled input's rows when that needs fewer
    (`preparation.use_pooled_inputs`). None when a site's positions per sample are unknown."""
    def need(tensor: str) -> int | None:
        rows = rows_per_sample(shapes, tensor, space.tensors[tensor].axis)
        return None if not rows else -(-(space.tensors[tensor].size + 1) // rows)

    needs = []
    for tensor in space.sites:
        options = [n for n in (need(tensor), need(space.pooled[tensor]) if tensor in space.pooled else None) if n is not None]
        if not options:
            return None
        needs.append(min(options))
    return max(needs, default=None)


def inspect_model(model: str | Path | onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, exclude: list[str] | None = None) -> InspectReport:
    """Analyse a model without calibration data."""
    proto, name, _, load_notes = load_model(model)
    shapes = {**default_input_shapes(proto), **(input_shapes or {})}
    problems: list[str] = []
    _, index = shapes_and_index(proto, shapes, problems)
    ones = {**{k: tuple(max(d, 1) for d in v) for k, v in shapes.items()}, **(input_shapes or {})}
    if problems and ones != shapes:  # an input named like a cache that is not one: every dim 1, as before
        retry: list[str] = []
        _, second = shapes_and_index(proto, ones, retry)
        if not retry:
            shapes, problems, index = ones, retry, second
    index, analysis = analyse_unfused(proto, exclude, index)
    cost = build_cost_model(index, analysis)
    spaces = [
        SpaceInfo(
            space.name, space.n, list(space.producers), sorted({c.node for c in space.consumers}), list(space.pass_through),
            list(space.sites), int(sum(t.base for p in space.producers for t in cost.node_terms(p))), list(space.pinned),
            samples_needed(space, index.shapes), len(space.locked), list(space.lock_reasons),
            None if space.derived is None else space.derived.node,
        )
        for space in analysis.spaces
    ]
    notes = load_notes + [f"the model does not run at {_shapes_text(shapes)} ({problem}): shapes it computes at run time are unknown, and "
             "spaces that need them are pinned; give the real sizes with --input-shapes NAME:D,D,.." for problem in problems]
    notes += [hint for hint in (unanalysed_ops(proto), training_mode_ops(proto)) if hint]
    return InspectReport(name, count_params(proto), cost.total_macs, {k: list(v) for k, v in shapes.items()}, spaces, notes)


def default_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Input sizes to analyse at without data: every dynamic dim 1, except a KV cache's past
    length, 0 (an empty cache, as a calibration run has it): with a past of 1 the attention mask
    of 1 contradicted past + sequence = 2, the probe run failed and every head read as pinned."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    named = {d.dim_param for v in inputs if not CACHE_NAME.search(v.name) for d in v.type.tensor_type.shape.dim if d.dim_param}
    shapes = {}
    for value in inputs:
        cache = CACHE_NAME.search(value.name) is not None
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else 0 if cache and axis > 0 and d.dim_param not in named else 1
            for axis, d in enumerate(value.type.tensor_type.shape.dim))
    return shapes


def _shapes_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k}{tuple(v)}" for k, v in shapes.items())
