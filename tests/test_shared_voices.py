"""A voices folder shared by replicas on several hosts (NFS): saving stays atomic and exclusive, and a
voice deleted by another host is unknown, not damaged."""

from __future__ import annotations

import os

import numpy as np
import pytest

from csm_fixtures import random_codes
from csm_gguf import atomic, voices
from csm_gguf.generator import Segment
from csm_gguf.tts import Voice


def test_a_link_whose_reply_was_lost_is_still_ours(tmp_path, monkeypatch):
    """NFS sends a LINK again when its reply is lost; the retry fails with EEXIST on the link the first
    try made. The file was saved: that is no "exists" error."""
    link = os.link

    def retried_link(src, dst):
        link(src, dst)
        raise FileExistsError(17, "File exists", dst)

    monkeypatch.setattr(atomic.os, "link", retried_link)
    target = tmp_path / "v.npz"
    atomic.write_atomic(target, b"saved", replace=False)
    assert target.read_bytes() == b"saved" and os.stat(target).st_nlink == 1 and os.listdir(tmp_path) == ["v.npz"]


def test_a_name_taken_by_another_host_is_still_refused(tmp_path, monkeypatch):
    target = tmp_path / "v.npz"
    link = os.link

    def other_host_first(src, dst):  # another host's file lands between our check and our link
        target.write_bytes(b"theirs")
        link(src, dst)

    monkeypatch.setattr(atomic.os, "link", other_host_first)
    with pytest.raises(FileExistsError):
        atomic.write_atomic(target, b"ours", replace=False)
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["v.npz"]


def test_without_hard_links_a_voice_is_saved_and_a_taken_name_still_refused(tmp_path, monkeypatch):
    """A file system without hard links (some FUSE mounts, SMB): saving falls back to a check, then a rename."""
    import errno

    target = tmp_path / "v.npz"
    taken = []

    def no_links(src, dst):  # and, when asked, another saver's file lands first
        if taken:
            target.write_bytes(b"theirs")
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    atomic.write_atomic(target, b"ours", replace=False)
    assert target.read_bytes() == b"ours" and os.listdir(tmp_path) == ["v.npz"]
    target.unlink()
    taken.append(True)
    with pytest.raises(FileExistsError):
        atomic.write_atomic(target, b"ours", replace=False)
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["v.npz"]


def test_temporary_names_are_unique_across_hosts(tmp_path, monkeypatch):
    made = []
    real_open = os.open
    monkeypatch.setattr(atomic.os, "open", lambda path, *a: made.append(path) or real_open(path, *a))
    atomic.write_atomic(tmp_path / "v.npz", b"x", replace=False)
    assert f".{os.uname().nodename}.{os.getpid()}." in made[0]


def test_a_voice_deleted_elsewhere_while_loading_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path))
    voices.save_voice("gone", Voice([Segment(1, "Hi.", random_codes(4, 64, seed=1))], speaker=1))

    load = np.load

    def deleted_meanwhile(path, **kwargs):  # it existed when checked; another host deleted it since
        os.unlink(path)
        return load(path, **kwargs)

    monkeypatch.setattr(voices.np, "load", deleted_meanwhile)
    with pytest.raises(ValueError, match="unknown voice 'gone'"):
        voices.load_voice("gone")


@pytest.mark.parametrize("voice, error", [
    (Voice([Segment(np.int64(1), "Words.", random_codes(13, 64, seed=1))], np.int64(1)), None),  # tts.segment's
    (Voice([Segment(0, "Words.", random_codes(13, 64, seed=1))], -3), "a speaker id is a whole number >= 0"),
    (Voice([Segment(0, "Words.", random_codes(13, 64, seed=1))], 1.5), "a speaker id is a whole number >= 0"),
    (Voice([Segment(0, None, random_codes(13, 64, seed=1))], 0), "a context segment's text is what its audio says"),
    (Voice([Segment(0, "Words.", random_codes(13, 64, seed=1)[0])], 0), "voice codes are (frames, codebooks)"),
    ([Segment(0, "Words.", random_codes(13, 64, seed=1))], "save a Voice (voices.Voice(segments, speaker))"),
])
def test_a_voice_is_saved_only_as_it_can_be_used(tmp_path, monkeypatch, voice, error):
    """These saved (a JSON TypeError for numpy's ints aside) and then loaded as damaged, or not as given (a speaker
    1.5 as 1, a text None as 'None')."""
    monkeypatch.setenv("CSM_GGUF_VOICES", str(tmp_path))
    if error is None:
        voices.save_voice("v", voice)
        assert voices.load_voice("v").speaker == 1
    else:
        with pytest.raises((ValueError, TypeError), match=error.replace("(", r"\(").replace(")", r"\)")):
            voices.save_voice("v", voice)
        assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="a voice name is a string, got NoneType"):
        voices.load_voice(None)
