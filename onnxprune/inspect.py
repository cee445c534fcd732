"""`onnxprune inspect`: what would be pruned, before any calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

from .analyse import analyse
from .cost import build_cost_model, count_params
from .graph import GraphIndex, static_shapes
from .inputs import input_specs
from .load import load_model


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


@dataclass
class InspectReport:
    """Prunable and pinned spaces, with params and MACs (symbolic dims taken as 1)."""

    model: str
    params: int
    macs: int
    input_shapes: dict[str, list[int]]
    spaces: list[SpaceInfo]

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        shapes = ", ".join(f"{k}{tuple(v)}" for k, v in self.input_shapes.items())
        console.print(f"[bold]{self.model}[/bold]: {self.params:,} params, {self.macs:,} MACs per run at {shapes}")
        prunable = Table(title="prunable spaces")
        for column in ("space (first producer)", "units", "producers", "consumers", "MACs"):
            prunable.add_column(column, justify="right" if column in ("units", "producers", "consumers", "MACs") else "left", overflow="fold")
        for space in self.spaces:
            if not space.pinned:
                prunable.add_row(space.name, str(space.units), str(len(space.producers)), str(len(space.consumers)), f"{space.macs:,}")
        console.print(prunable)
        pinned = [s for s in self.spaces if s.pinned]
        if pinned:
            table = Table(title="pinned spaces (never pruned)")
            for column in ("space", "units", "reason"):
                table.add_column(column, overflow="fold")
            for space in pinned:
                table.add_row(space.name, str(space.units), "; ".join(space.pinned))
            console.print(table)


def inspect_model(model: str | Path | onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None, exclude: list[str] | None = None) -> InspectReport:
    """Analyse a model without calibration data."""
    proto, name, _ = load_model(model)
    shapes = dict(input_shapes or {})
    for spec in input_specs(proto):
        shapes.setdefault(spec.name, tuple(1 if d is None else d for d in spec.dims))
    index = GraphIndex(proto, static_shapes(proto, shapes))
    analysis = analyse(proto, exclude, index=index)
    cost = build_cost_model(index, analysis)
    spaces = [
        SpaceInfo(
            space.name, space.n, list(space.producers), sorted({c.node for c in space.consumers}), list(space.pass_through),
            list(space.sites), int(sum(t.base for p in space.producers for t in cost.node_terms(p))), list(space.pinned),
        )
        for space in analysis.spaces
    ]
    return InspectReport(name, count_params(proto), cost.total_macs, {k: list(v) for k, v in shapes.items()}, spaces)
