"""Speak one sentence to a WAV file.

    python examples/simple.py [--model DIR] [--output hello.wav] [--max-audio-ms MS]
"""

import argparse

from csm_gguf import CSM
from csm_gguf.audio import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="converted model directory (default: the cache)")
parser.add_argument("--output", default="hello.wav")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()

tts = CSM(args.model)
# In voice alloy, the default: a built-in voice prompt, made on first use and kept (a bare speaker id would be
# the raw model, another voice every time).
audio = tts.generate("Hello from CSM, running on llama.cpp.", seed=42, max_audio_ms=args.max_audio_ms)
write_audio(args.output, audio)
print(f"{len(audio) / tts.sample_rate:.2f} s of speech written to {args.output}")
