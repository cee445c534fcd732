"""Fixtures shared by several test modules."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from onnxprune import tempfiles


@pytest.fixture()
def private_tmpdir(tmp_path, monkeypatch) -> Path:
    """TMPDIR is a fresh folder, so a test can see every temporary file a run makes (and this
    process sweeps it afresh)."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(tempfiles, "_SWEPT", set())
    return folder
