"""What the audio tests need from the machine: ffmpeg for aac (skipped without it; .ci/run installs it)."""

from __future__ import annotations

import pytest

from csm_gguf import ffmpeg
from csm_gguf.audio import FORMATS

needs_ffmpeg = pytest.mark.skipif(ffmpeg.find() is None, reason="ffmpeg is not installed (apt-get install ffmpeg)")
# Every output format; aac where ffmpeg is installed.
EVERY_FORMAT = [pytest.param(f, marks=needs_ffmpeg) if f == "aac" else f for f in FORMATS]
