"""Clone a voice from a reference recording and its transcript.

    python examples/voice_prompt.py REFERENCE.wav "What the reference says." [--model DIR] [--output cloned.wav]
                                    [--max-audio-ms MS]
"""

import argparse

from csm_gguf import CSM
from csm_gguf.audio import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("reference_audio")
parser.add_argument("transcript")
parser.add_argument("--model")
parser.add_argument("--output", default="cloned.wav")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()

tts = CSM(args.model)
# The reference is encoded once by the Mimi encoder; the segment can be reused for many sentences.
prompt = tts.segment(speaker=0, text=args.transcript, audio=args.reference_audio)
audio = tts.generate("This sentence is spoken in the reference voice.", speaker=0, context=[prompt],
                     seed=1, max_audio_ms=args.max_audio_ms)
write_audio(args.output, audio)
print(f"written to {args.output}")
