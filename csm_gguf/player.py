"""Playing speech while it is made, through an audio player program reading raw PCM from a pipe.

The player is the first of PLAYERS on PATH, or the command in $CSM_GGUF_PLAYER (which must read 16-bit
little-endian 24 kHz mono PCM from standard input). Audio goes to it through a queue and a thread, so
generating never waits for playback; where it is made slower than real time, `Playout` holds it back in
growing stretches rather than letting it stutter.
"""

from __future__ import annotations

import os
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from .audio import SAMPLE_RATE, to_int16

RATE = str(SAMPLE_RATE)
# Each reads 16-bit little-endian mono PCM at 24 kHz from stdin. PulseAudio's (which PipeWire serves
# too) and ALSA's own players first (Linux), then ffplay (ffmpeg) and sox's play (also macOS, from
# Homebrew). PipeWire's pw-play is left out: only recent versions read raw PCM.
PLAYERS = {
    "paplay": ["--raw", "--format=s16le", f"--rate={RATE}", "--channels=1"],
    "aplay": ["-q", "-t", "raw", "-f", "S16_LE", "-r", RATE, "-c", "1"],
    "ffplay": ["-nodisp", "-autoexit", "-loglevel", "error", "-f", "s16le", "-ar", RATE, "-ac", "1", "-i", "-"],
    "play": ["-q", "-t", "raw", "-r", RATE, "-e", "signed", "-b", "16", "-c", "1", "-"],
}
# What a player says when it cannot play but still exits 0: ffplay with no sound device prints this, stops
# reading and leaves as if done.
NO_SOUND_SAID = {"ffplay": "audio open failed"}


def find_player() -> list[str]:
    """The command that plays speech here, or a ValueError that says how to get one."""
    chosen = os.environ.get("CSM_GGUF_PLAYER", "").strip()
    if chosen:
        try:
            command = shlex.split(chosen)
        except ValueError as e:  # an unclosed quotation
            raise ValueError(f"CSM_GGUF_PLAYER={chosen!r} is not a command: {e}") from None
        if shutil.which(command[0]) is None:
            raise ValueError(f"CSM_GGUF_PLAYER={chosen!r}: {command[0]!r} is not a program on PATH")
        return command
    for program, arguments in PLAYERS.items():
        path = shutil.which(program)
        if path:
            return [path, *arguments]
    raise ValueError(f"no audio player found: install one of {', '.join(PLAYERS)} (play is sox's), or set "
                     "CSM_GGUF_PLAYER to a command that plays 16-bit 24 kHz mono PCM from standard input")


class Playout:
    """When to hand the audio held so far to the player. While it keeps up, at once. Once the player has run
    dry (the speech is made slower than real time), only when twice as much as the last time is held
    (1 s, 2 s, 4 s...): a few longer pauses instead of a gap after every chunk."""

    def __init__(self) -> None:
        self.held = 0.0  # seconds of audio not yet handed over
        self.wait_for = 0.0  # seconds to hold before handing over after running dry
        self.ends_at: float | None = None  # when what was handed over ends playing (None: stopped)
        self.dry = 0  # times the player ran dry

    def add(self, seconds: float, now: float) -> bool:
        """`seconds` more audio at time `now`: True if everything held should go to the player now."""
        self.held += seconds
        if self.ends_at is not None and now > self.ends_at:
            self.ends_at, self.wait_for, self.dry = None, max(1.0, 2 * self.wait_for), self.dry + 1
        if self.ends_at is None and self.held < self.wait_for:
            return False
        self.ends_at = max(self.ends_at or now, now) + self.held
        self.held = 0.0
        return True


class Player:
    """One player process for one stream of speech: `feed` never blocks, `finish` waits for the end. The
    player's own messages (a missing sound device, say) go to stderr as it writes them, and are watched
    for the one that says it could not play (NO_SOUND_SAID)."""

    def __init__(self, command: list[str]) -> None:
        self.name = os.path.basename(command[0])
        self._no_sound_said = NO_SOUND_SAID.get(self.name)
        self.no_sound = False  # the player said it has no sound device
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        self._chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="player", daemon=True)
        self._listener = threading.Thread(target=self._listen, name="player-messages", daemon=True)
        self._writer.start()
        self._listener.start()

    def feed(self, samples: np.ndarray) -> None:
        self._chunks.put(to_int16(samples).astype("<i2").tobytes())

    def finish(self) -> None:
        """Waits until everything fed has played; a ValueError if the player failed."""
        self._chunks.put(None)
        self._writer.join()
        status = self._process.wait()
        self._listener.join()
        if status:
            raise ValueError(f"the audio player {self.name} failed (exit status {status}): see its message above, "
                             "or set CSM_GGUF_PLAYER to another player")
        if self.no_sound:
            raise ValueError(f"the audio player {self.name} could not open a sound device, so nothing was heard: "
                             "see its message above; write to a file with -o instead, or set CSM_GGUF_PLAYER")

    def close(self) -> None:
        """Stops playing now."""
        if self._process.poll() is None:
            self._process.kill()
        self._chunks.put(None)
        self._writer.join()
        self._process.wait()
        self._listener.join()

    def _listen(self) -> None:
        """Passes the player's messages on to stderr, noting the one that says it cannot play."""
        for line in self._process.stderr:
            text = line.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            if self._no_sound_said and self._no_sound_said in text:
                self.no_sound = True
        self._process.stderr.close()

    def _write(self) -> None:
        playout, held = Playout(), []
        try:
            while (chunk := self._chunks.get()) is not None:
                held.append(chunk)
                if playout.add(len(chunk) / (2 * SAMPLE_RATE), time.monotonic()):
                    self._process.stdin.write(b"".join(held))
                    self._process.stdin.flush()
                    held.clear()
            self._process.stdin.write(b"".join(held))
        except (BrokenPipeError, ValueError):  # the player is gone (closed, or failed): the rest goes unheard
            pass
        finally:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
