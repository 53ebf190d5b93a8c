"""atomic.write_atomic: a file appears whole or not at all, and a replaced file keeps what was asked of it."""

from __future__ import annotations

import os
import stat

import pytest

from csm_gguf import atomic


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """A private file (0600) came back world-readable (0644): the new file took the umask's mode."""
    target = tmp_path / "speech.wav"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    fresh = tmp_path / "fresh.wav"
    atomic.write_atomic(fresh, b"new")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_a_file_this_process_may_not_write_is_refused_and_kept(tmp_path, monkeypatch):
    target = tmp_path / "speech.wav"
    target.write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "access", lambda path, how: False)  # as for a user other than root
    with pytest.raises(PermissionError, match="the file is read-only"):
        atomic.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["speech.wav"]
