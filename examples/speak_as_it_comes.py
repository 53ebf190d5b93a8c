"""Speak text while it is still arriving (an LLM's output piped in): each sentence as soon as it is complete,
as raw PCM on stdout.

    your-llm-command | python examples/speak_as_it_comes.py [--model DIR] [--max-audio-ms MS] \
        | aplay -f S16_LE -r 24000 -c 1
"""

import argparse
import codecs
import os
import sys

from csm_gguf import CSM
from csm_gguf.audio import to_int16

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()


def stdin_text():
    """Whatever text has arrived on stdin, without waiting for a whole line or the end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while data := os.read(sys.stdin.fileno(), 4096):
        yield decoder.decode(data)
    yield decoder.decode(b"", final=True)


tts = CSM(args.model)
for chunk in tts.stream_text(stdin_text(), seed=0, max_audio_ms=args.max_audio_ms):
    sys.stdout.buffer.write(to_int16(chunk).tobytes())
    sys.stdout.buffer.flush()
