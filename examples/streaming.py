"""Stream speech as it is generated: frames of codes -> audio chunks -> raw PCM on stdout.

    python examples/streaming.py [--model DIR] [--max-audio-ms MS] | aplay -f S16_LE -r 24000 -c 1
"""

import argparse
import sys
import time

from csm_gguf import CSM
from csm_gguf.audio import to_int16

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()

tts = CSM(args.model)
start = time.perf_counter()
first = None
# Each chunk is one 80 ms frame, decoded by the streaming Mimi decoder the moment it is generated.
for chunk in tts.stream("Streaming starts with the very first frame.", chunk_frames=1, seed=0,
                        max_audio_ms=args.max_audio_ms):
    if first is None:
        first = time.perf_counter() - start
    sys.stdout.buffer.write(to_int16(chunk).tobytes())
    sys.stdout.buffer.flush()
print("no audio: the model ended at once" if first is None else f"first audio after {first:.3f} s", file=sys.stderr)
