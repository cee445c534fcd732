"""Spaces whose sites saw too few calibration rows: pinned where the rows cannot tell redundancy
from missing data, a warning where their statistics are thin, and a hint on a target that only
those spaces could have met."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .analyse import Analysis
from .errors import TargetError
from .plan import agree, counted
from .stats import SiteStats

WELL_SAMPLED = 4  # rows per unit below which a site's statistics are flagged as noisy
NAMED = 3  # spaces or sites a grouped warning names
UNDERSAMPLED = "calibration rows (samples x positions) to prune it"  # the end of pin_undersampled's pin reason


def pin_undersampled(analysis: Analysis, stats: dict[str, SiteStats]) -> list[str]:
    """Pin spaces whose statistics cannot tell redundancy from missing data, warn on thin ones.

    With fewer rows than units, any unit beyond the rank looks exactly redundant (zero energy)
    only because it was not observed (e.g. a 1280-channel head after global pooling with 256
    images): such spaces are pinned, with the number of samples needed. One warning line per
    kind, naming the first few (a deep net on a small calibration set has dozens)."""
    pinned: dict[str, str] = {}  # space -> its site and rows
    noisy: dict[str, str] = {}  # site -> its rows (a site shared by several spaces is named once)
    for space in analysis.prunable:
        for tensor in space.sites:
            rows, width = stats[tensor].count, space.tensors[tensor].size
            if rows <= width:
                space.pinned.append(f"site '{tensor}' saw only {rows} rows for {width} units: give at least {width + 1} {UNDERSAMPLED}")
                pinned[space.name] = f"its site '{tensor}' saw {rows} rows for {width} units"
                break
            if rows < WELL_SAMPLED * width:
                noisy.setdefault(tensor, f"{rows} rows for {width} units")
    warnings = []
    if pinned:
        warnings.append(f"{counted(len(pinned), 'space')} not pruned, too few calibration rows to judge redundancy "
                        f"({first_named(pinned)}); give more calibration samples")
    if noisy:
        warnings.append(f"{counted(len(noisy), 'site')} saw fewer than {WELL_SAMPLED} calibration rows per unit, so "
                        f"{agree(len(noisy), 'its', 'their')} statistics are noisy ({first_named(noisy)}); more calibration samples help")
    return warnings


def first_named(why: dict[str, str]) -> str:
    """The first NAMED entries as "'name': why; ...", and how many more there are."""
    shown = "; ".join(f"'{name}': {reason}" for name, reason in list(why.items())[:NAMED])
    return shown + (f"; and {len(why) - NAMED} more" if len(why) > NAMED else "")


@contextmanager
def undersampled_hint(analysis: Analysis) -> Iterator[None]:
    """A target that cannot be reached also names the spaces left unpruned for too few
    calibration rows: more samples, not other options, is the way out there."""
    try:
        yield
    except TargetError as exc:
        starved = [s.name for s in analysis.spaces if any(r.endswith(UNDERSAMPLED) for r in s.pinned)]
        if not starved:
            raise
        raise TargetError(f"{exc}; {counted(len(starved), 'space')} saw too few calibration rows to be pruned (e.g. '{starved[0]}'): "
                          "give more calibration samples") from None
