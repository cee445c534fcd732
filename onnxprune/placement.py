"""Where a space's units sit on a tensor's unit axis (Concat shifts them, Split/Slice cut them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Units lo..hi-1 of a space sit at positions offset..offset+(hi-lo)-1."""

    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Placement:
    """A space's units on one tensor: the unit axis, its width in slots, and the segments.

    Each slot holds `block` consecutive elements of the axis (an attention head's d_head
    columns), so the axis has width x block elements.
    """

    axis: int
    width: int
    segments: tuple[Segment, ...]
    block: int = 1

    @classmethod
    def identity(cls, axis: int, n: int, block: int = 1) -> Placement:
        return cls(axis, n, (Segment(0, 0, n),), block)

    def is_identity(self, n: int) -> bool:
        return self.width == n and self.segments == (Segment(0, 0, n),)

    @property
    def size(self) -> int:
        """Elements on the unit axis."""
        return self.width * self.block

    def moved(self, axis: int, block: int | None = None, width: int | None = None) -> Placement:
        """The same units on another axis (Transpose, Unsqueeze) or with another block (Reshape)."""
        block = self.block if block is None else block
        width = self.size // block if width is None else width
        return Placement(axis, width, self.segments, block)

    def element_positions_of(self, units: np.ndarray) -> np.ndarray:
        """Element indices (ascending) on the unit axis of the given units."""
        return expand_blocks(self.positions_of(units), self.block)

    def unit_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(units, positions), aligned: unit units[i] is at position positions[i]."""
        units = [np.arange(s.lo, s.hi) for s in self.segments]
        positions = [np.arange(s.offset, s.offset + s.hi - s.lo) for s in self.segments]
        if not units:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(units), np.concatenate(positions)

    def positions_of(self, units: np.ndarray) -> np.ndarray:
        """Positions (ascending) of the given units that appear on this tensor."""
        if len(self.segments) == 1:  # the common case, without building the unit table
            segment = self.segments[0]
            units = np.asarray(units, dtype=np.int64)
            return np.unique(units[(units >= segment.lo) & (units < segment.hi)]) - segment.lo + segment.offset
        all_units, positions = self.unit_positions()
        return np.sort(positions[np.isin(all_units, units)])

    def count(self) -> int:
        return sum(s.hi - s.lo for s in self.segments)

    @property
    def repeats(self) -> int:
        """How many times the tensor carries each unit (2: a bidirectional LSTM's hidden unit,
        once per direction side by side after [T, N, 2, H] -> [T, N, 2H]); 1 unless every unit
        on the tensor appears the same number of times."""
        units = self.unit_positions()[0]
        counts = np.unique(units, return_counts=True)[1]
        return int(counts[0]) if len(counts) and np.all(counts == counts[0]) else 1  # else some units twice (a C2f Concat): 1

    def unit_major(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols): element cols[i] of the unit axis is element rows[i] when the units' elements
        are laid out unit after unit, each owning repeats x block (its copies in position order)."""
        units, positions = self.unit_positions()
        order = np.lexsort((positions, units))
        units, positions = units[order], positions[order]
        occurrence = np.arange(len(units)) - np.searchsorted(units, units)
        return expand_blocks(units * self.repeats + occurrence, self.block), expand_blocks(positions, self.block)

    def repeated(self, copies: int) -> Placement:
        """The unit axis merged with `copies` indices of the axes before it: every unit appears
        once per index, each copy `width` slots after the previous one."""
        segments = tuple(Segment(s.offset + r * self.width, s.lo, s.hi) for r in range(copies) for s in self.segments)
        return Placement(self.axis, self.width * copies, segments, self.block)

    def shifted(self, shift: int, width: int, axis: int | None = None) -> Placement:
        moved = tuple(Segment(s.offset + shift, s.lo, s.hi) for s in self.segments)
        return Placement(self.axis if axis is None else axis, width, moved, self.block)

    def permuted(self, new_position: np.ndarray) -> Placement:
        """The units after a permutation of the axis that moves position p to new_position[p]
        (a channel shuffle): runs of consecutive units that stay consecutive form a segment."""
        units, positions = self.unit_positions()
        moved = np.asarray(new_position)[positions]
        order = np.argsort(moved, kind="stable")
        units, moved = units[order], moved[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(units) != 1) | (np.diff(moved) != 1)])
        ends = np.r_[starts[1:], len(units)]
        segments = tuple(Segment(int(moved[a]), int(units[a]), int(units[a]) + int(b - a)) for a, b in zip(starts, ends, strict=True))
        return Placement(self.axis, self.width, segments, self.block)

    def window(self, start: int, stop: int) -> Placement | None:
        """The part of this placement inside positions [start, stop), re-based to start; None if empty."""
        cut = []
        for s in self.segments:
            a, b = max(s.offset, start), min(s.offset + s.hi - s.lo, stop)
            if a < b:
                cut.append(Segment(a - start, s.lo + a - s.offset, s.lo + b - s.offset))
        return Placement(self.axis, stop - start, tuple(cut), self.block) if cut else None

    def merged(self, other: Placement) -> Placement | None:
        """Union of two placements of the same tensor; None if they overlap or disagree."""
        if other.axis != self.axis or other.width != self.width or other.block != self.block:
            return None
        segments = tuple(sorted(set(self.segments) | set(other.segments), key=lambda s: s.offset))
        ends = [(s.offset, s.offset + s.hi - s.lo) for s in segments]
        if any(a[1] > b[0] for a, b in zip(ends, ends[1:], strict=False)):
            return None
        return Placement(self.axis, self.width, segments, self.block)


def removed_count(removed: np.ndarray, start: int, stop: int) -> int:
    """How many removed positions fall in [start, stop)."""
    return int(np.count_nonzero((removed >= start) & (removed < stop)))


def expand_blocks(positions: np.ndarray, block: int) -> np.ndarray:
    """Positions of units -> feature indices when every unit owns `block` consecutive features."""
    if block == 1:
        return positions
    return (positions[:, None] * block + np.arange(block)[None, :]).ravel()
