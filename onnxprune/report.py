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
    locked: int = 0  # units always kept (a multi-query KV head), and why
    lock_reasons: list[str] = field(default_factory=list)
    derived_from: str | None = None  # grouped-query KV heads: removed with every query head this Gather repeats them for


DERIVED_MARK = " (KV heads)"
DERIVED_NOTE = "(KV heads): a grouped-query key or value projection; a KV head goes once every query head that reads it goes"


def print_lock_notes(console: Console, spaces: list) -> None:
    """One line per prunable space with locked units (a report's or inspect's rows: name, units,
    locked, lock_reasons, pinned)."""
    for row in spaces:
        if row.locked and not row.pinned:
            console.print(f"note: '{row.name}' always keeps {row.locked} of its {row.units} units: {'; '.join(row.lock_reasons)}")


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
    io_changes: dict[str, list] = field(default_factory=dict)
    spatial_strides: dict[str, int] = field(default_factory=dict)  # sites whose feature maps were subsampled
    latency: dict = field(default_factory=dict)  # with a latency target: batch, threads, measured ratio, search steps
    sequential: dict = field(default_factory=dict)  # with --sequential: segments, shrinkage and held-out error per site
    sensitivity: dict = field(default_factory=dict)  # with --allocation sensitivity: each space's probe and gain
    allocation: dict = field(default_factory=dict)  # with --allocation auto: the candidates' held-out errors and the choice
    fit: dict = field(default_factory=dict)  # one-shot or sequential recovery, and whether (and why) auto chose it
    fidelity_independent: bool = False  # measured on --report-samples, which no choice of the run read

    def fidelity_title(self) -> str:
        """Where the fidelity was measured: samples no choice read, or the held-out samples that
        also chose the allocation and the refit (then optimistic on new data)."""
        if self.fidelity_independent:
            return f"output fidelity on {self.verification_samples} report samples that no choice of the run read"
        return (f"output fidelity on {self.verification_samples} held-out samples (they also chose among the candidate models: "
                "expect larger errors on new data; --report-samples N measures on samples no choice reads)")

    @property
    def pinned(self) -> list[SpaceRow]:
        return [s for s in self.spaces if s.pinned]

    def to_dict(self) -> dict:
        return asdict(self)

    def latency_note(self) -> str:
        threads = self.latency["threads"] or "default"
        return (f"measured onnxruntime CPU latency: {self.latency['ratio']:.1%} of the original (batch {self.latency['batch']}, "
                f"{threads} threads, {len(self.latency['steps'])} candidates timed on this machine)")

    def fit_note(self) -> str | None:
        """One line on the recovery fit when the automatic choice made it."""
        if not self.fit.get("auto"):
            return None
        other = "--one-shot for a single calibration pass" if self.fit["mode"] == "sequential" else "--sequential to refit anyway"
        return f"recovery fit: {self.fit['mode']} (auto: {self.fit['reason']}; {other})"

    def sequential_note(self) -> str | None:
        """One line on the sequential fit, when it ran."""
        if not self.sequential:
            return None
        ratio = self.sequential.get("median_heldout_error_vs_one_shot")
        error = "" if ratio is None else f"; median held-out site error {ratio:.3g}x the one-shot fit's"
        samples = f" on {self.sequential['samples']} calibration samples" if self.sequential.get("samples") else ""
        rechosen = self.sequential.get("rechosen") or []
        again = f"; units chosen again in {len(rechosen)} layers (e.g. '{rechosen[0]}')" if rechosen else ""
        if self.sequential.get("retried"):
            again = f"; {self.sequential['retried']}"
        line = (f"sequential recovery: {len(self.sequential['sites'])} sites refitted on the pruned model in {self.sequential['segments']} "
                f"segments{samples}{error}{again}")
        errors = self.sequential.get("heldout_model_error")
        if self.sequential.get("rejected"):
            return line + f"; NOT kept, the one-shot model was written: {self.sequential['rejected']}"
        if errors and not self.sequential.get("kept", True):
            return line + f"; NOT kept: the model's held-out output error was {errors[1]:.3g} vs {errors[0]:.3g} one-shot"
        return line + (f"; held-out output error {errors[1]:.3g} vs {errors[0]:.3g} one-shot" if errors else "")

    def sensitivity_note(self) -> str | None:
        """One line on the sensitivity allocation's probes, when it ran."""
        if not self.sensitivity:
            return None
        gains = [row["gain"] for row in self.sensitivity["spaces"]] or [1.0]
        probed = sum("kept" in row for row in self.sensitivity["spaces"])
        return (f"sensitivity allocation: {probed} spaces probed alone on {self.sensitivity['samples']} calibration samples in "
                f"{self.sensitivity['seconds']:.1f} s; gains {min(gains):.3g}..{max(gains):.3g} x the median")

    def allocation_note(self) -> str | None:
        """One line on the auto allocation's choice (or the stream rule's measurement), when it ran."""
        if not self.allocation:
            return None
        stream, joined = self.allocation.get("stream") or {}, ""
        if stream.get("failed"):
            joined = f"; the stream candidate was left out: {stream['failed']}"
        elif stream.get("gains"):
            gains = stream["gains"].values()
            joined = (f"; {len(gains)} spaces join a residual stream (gains {min(gains):.3g}..{max(gains):.3g}, "
                      f"measured on {stream['samples']} calibration samples)")
        if "chosen" not in self.allocation:
            return f"allocation: stream{joined or '; no space joins a residual stream (the global rule)'}"
        scored = ", ".join(f"{name} {'n/a' if e is None else f'{e:.3g}'}" for name, e in self.allocation["heldout_error"].items())
        refitted = self.allocation.get("refitted")
        at = f" at {self.allocation['compared_at']}" if self.allocation.get("compared_at") else ""
        if refitted:
            finalists = ", ".join([*(f"{name} {e:.3g}" for name, e in refitted["errors"].items()),
                                   *(f"{name} failed" for name in refitted.get("failed", {}))])
            samples = ("calibration and held-out samples" if refitted.get("calibration") != "unfitted"
                       else "samples the refit did not fit (calibration and held-out)")
            return (f"allocation: {self.allocation['chosen']}, chosen by the output error after the refit on "
                    f"{refitted['samples']} {samples} ({finalists}; one-shot on "
                    f"{self.allocation['samples']} held-out samples{at}: {scored}){joined}")
        unjudged = f"; {self.allocation['unjudged']}" if self.allocation.get("unjudged") else ""
        return (f"allocation: {self.allocation['chosen']}, chosen by the output error on {self.allocation['samples']} held-out "
                f"samples{at} ({scored}){unjudged}{joined}")

    def sampling_note(self) -> str | None:
        """One line on the spatial subsampling of the statistics, when there was any."""
        if not self.spatial_strides:
            return None
        strides = sorted(set(self.spatial_strides.values()))
        span = str(strides[0]) if len(strides) == 1 else f"{strides[0]}..{strides[-1]}"
        return (f"statistics use every s-th row and column (s = {span}) of {len(self.spatial_strides)} conv feature maps "
                "(keeps calibration near inference speed; --spatial-stride 1 uses every position)")

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def markdown(self) -> str:
        """A Markdown summary for CI logs and pull requests."""
        target = ", ".join(f"{k} {v}" for k, v in self.target.items())
        lines = [
            f"## onnxprune: `{self.model}`",
            "",
            f"method **{self.method}** (order {self.order}), target {target}, threshold {self.threshold:.3g}; "
            f"{self.calibration_samples} calibration / {self.verification_samples} verification samples",
            "",
            "| | before | after | kept |",
            "|---|---:|---:|---:|",
            f"| params | {self.params_before:,} | {self.params_after:,} | {_ratio(self.params_before, self.params_after)} |",
            f"| MACs / sample | {self.macs_before:,} | {self.macs_after:,} | {_ratio(self.macs_before, self.macs_after)} |",
            f"| prunable units | {self.units_before} | {self.units_after} | {_ratio(self.units_before, self.units_after)} |",
            "",
            "| layer (space) | units kept | MACs before | MACs after |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| `{r.name}`{DERIVED_MARK if r.derived_from else ''} | {r.kept}/{r.units} | {r.macs_before:,} | {r.macs_after:,} |"
                  for r in self.spaces if not r.pinned]
        if any(r.derived_from and not r.pinned for r in self.spaces):
            lines += ["", DERIVED_NOTE]
        if self.pinned:
            lines += ["", "| pinned (not prunable) | units | reason |", "|---|---:|---|"]
            lines += [f"| `{r.name}` | {r.units} | {'; '.join(r.pinned)} |" for r in self.pinned]
        if self.fidelity:
            lines += ["", f"{self.fidelity_title()[0].upper()}{self.fidelity_title()[1:]}:", "",
                      "| output | relative L2 | cosine | max abs diff | top-1 agreement |", "|---|---:|---:|---:|---:|"]
            for f in self.fidelity:
                top1 = "-" if f.top1_agreement is None else f"{f.top1_agreement:.1%}"
                lines.append(f"| `{f.name}` | {f.relative_l2:.3g} | {f.cosine:.6f} | {f.max_abs:.3g} | {top1} |")
        lines += ["", *(f"> warning: {w}" for w in self.warnings)] if self.warnings else []
        lines += ["", f"> note: {self.sampling_note()}"] if self.spatial_strides else []
        lines += ["", f"> {self.latency_note()}"] if self.latency else []
        lines += ["", f"> {self.fit_note()}"] if self.fit_note() else []
        lines += ["", f"> {self.sequential_note()}"] if self.sequential else []
        lines += ["", f"> {self.sensitivity_note()}"] if self.sensitivity else []
        lines += ["", f"> {self.allocation_note()}"] if self.allocation else []
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> None:
        """One figure: units kept and MACs before/after per layer (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            from .errors import OnnxPruneError

            raise OnnxPruneError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
        rows = [r for r in self.spaces if not r.pinned]
        names = [r.name if len(r.name) <= 28 else "…" + r.name[-27:] for r in rows]
        positions = range(len(rows))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 7), sharex=True)
        top.bar(positions, [r.units for r in rows], color="#d0d0d0", label="units before")
        top.bar(positions, [r.kept for r in rows], color="#3a7bd5", label="units kept")
        top.set_ylabel("units")
        top.legend()
        top.set_title(f"{Path(self.model).name}: {self.method}, MACs kept {_ratio(self.macs_before, self.macs_after)}")
        width = 0.4
        bottom.bar([p - width / 2 for p in positions], [r.macs_before for r in rows], width, color="#d0d0d0", label="MACs before")
        bottom.bar([p + width / 2 for p in positions], [r.macs_after for r in rows], width, color="#e07b39", label="MACs after")
        bottom.set_ylabel("MACs of the layer")
        bottom.legend()
        bottom.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def render(self, console: Console | None = None) -> None:
        console = console or Console()
        console.print(_summary_table(self))
        console.print(_space_table(self))
        print_lock_notes(console, self.spaces)
        if self.pinned:
            console.print(_pinned_table(self))
        if self.fidelity:
            console.print(_fidelity_table(self))
        for name, shape in self.io_changes.items():
            console.print(f"[bold]model I/O changed:[/bold] '{name}' is now {shape} (its head axis was pruned)")
        if self.spatial_strides:
            console.print(f"note: {self.sampling_note()}")
        if self.latency:
            console.print(self.latency_note())
        if self.fit_note():
            console.print(self.fit_note())
        if self.sequential:
            console.print(self.sequential_note())
        if self.sensitivity:
            console.print(self.sensitivity_note())
        if self.allocation:
            console.print(self.allocation_note())
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
        name = row.name + (DERIVED_MARK if row.derived_from else "")
        table.add_row(name, f"{row.kept}/{row.units}", _ratio(row.units, row.kept), _count(row.macs_before), _count(row.macs_after))
    if any(r.derived_from and not r.pinned for r in report.spaces):
        table.caption = DERIVED_NOTE
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
    table = Table(title=report.fidelity_title())
    for column in ("output", "relative L2 error", "cosine", "max |diff|", "top-1 agreement"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for f in report.fidelity:
        top1 = "-" if f.top1_agreement is None else f"{f.top1_agreement:.1%}"
        table.add_row(f.name, f"{f.relative_l2:.3g}", f"{f.cosine:.6f}", f"{f.max_abs:.3g}", top1)
    return table
