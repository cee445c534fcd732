"""The report: before/after numbers, per-space decisions, pinned spaces and output fidelity."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .verify import OutputFidelity


@dataclass
class SpaceRow:
    """One space: its units before/after and the MACs of the layers that produce them."""

    name: str
    producers: list[str]
    units: int
    kept: int
    macs_before: int
    macs_after: int
    pinned: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    """Everything a run decided and measured; `to_dict()` is what --report writes."""

    model: str
    method: str
    order: str
    target: dict
    threshold: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    units_before: int
    units_after: int
    calibration_samples: int
    verification_samples: int
    spaces: list[SpaceRow]
    fidelity: list[OutputFidelity]
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    output: str | None = None

    @property
    def pinned(self) -> list[SpaceRow]:
        return [s for s in self.spaces if s.pinned]

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(_summary_table(self))
        console.print(_space_table(self))
        if self.pinned:
            console.print(_pinned_table(self))
        if self.fidelity:
            console.print(_fidelity_table(self))
        for warning in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}")


def _ratio(before: float, after: float) -> str:
    return f"{after / before:.1%}" if before else "-"


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _summary_table(report: PruneReport) -> Table:
    target = ", ".join(f"{k}={v}" for k, v in report.target.items())
    table = Table(title=f"onnxprune: {report.model} ({report.method}, order={report.order}, {target})")
    for column in ("", "before", "after", "kept"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("params", _count(report.params_before), _count(report.params_after), _ratio(report.params_before, report.params_after))
    table.add_row("MACs / sample", _count(report.macs_before), _count(report.macs_after), _ratio(report.macs_before, report.macs_after))
    table.add_row("prunable units", str(report.units_before), str(report.units_after), _ratio(report.units_before, report.units_after))
    return table


def _space_table(report: PruneReport) -> Table:
    table = Table(title="units kept per layer")
    for column in ("layer (space)", "units", "kept", "MACs before", "MACs after"):
        table.add_column(column, justify="left" if column.startswith("layer") else "right")
    for row in report.spaces:
        if row.pinned:
            continue
        table.add_row(row.name, f"{row.kept}/{row.units}", _ratio(row.units, row.kept), _count(row.macs_before), _count(row.macs_after))
    return table


def _pinned_table(report: PruneReport) -> Table:
    table = Table(title="not prunable (pinned)")
    table.add_column("layer (space)")
    table.add_column("units", justify="right")
    table.add_column("reason")
    for row in report.pinned:
        table.add_row(row.name, str(row.units), "; ".join(row.pinned))
    return table


def _fidelity_table(report: PruneReport) -> Table:
    table = Table(title=f"output fidelity on {report.verification_samples} held-out samples")
    for column in ("output", "relative L2 error", "cosine", "max |diff|", "top-1 agreement"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for f in report.fidelity:
        top1 = "-" if f.top1_agreement is None else f"{f.top1_agreement:.1%}"
        table.add_row(f.name, f"{f.relative_l2:.3g}", f"{f.cosine:.6f}", f"{f.max_abs:.3g}", top1)
    return table
