"""Reading files and pipes in bounded pieces: a device such as /dev/zero, or a pipe that never ends,
is refused at a size limit instead of filling the memory, and callers check each piece as it comes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

PIECE = 2**20

# The limits, declared once: a text to speak (a long novel is 2 MB of UTF-8), and audio read from a pipe
# or file object, held whole to be decoded (the 164 s the context holds, as 48 kHz stereo float WAV: 63 MB).
MAX_TEXT_BYTES = 16 * 2**20
MAX_PIPED_AUDIO_BYTES = 128 * 2**20


class TooLarge(ValueError):
    """More bytes than the limit."""

    def __init__(self, what: str, limit: int, fix: str):
        super().__init__(f"{what} is larger than {limit >> 20} MiB, the most read: {fix}")


def pieces(f: BinaryIO, limit: int, what: str, fix: str) -> Iterator[bytes]:
    """`f`'s bytes in pieces of at most a MiB, as they are read; TooLarge once more than `limit` came,
    before the piece past it is handed on."""
    size = 0
    while piece := f.read(min(PIECE, limit + 1 - size)):
        size += len(piece)
        if size > limit:
            raise TooLarge(what, limit, fix)
        yield piece


def read_at_most(f: BinaryIO, limit: int, what: str, fix: str) -> bytes:
    return b"".join(pieces(f, limit, what, fix))
