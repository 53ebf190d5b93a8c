"""A conversation: each turn is spoken after what was said before it, so CSM keeps the two voices apart
and answers in tone. Optionally give each speaker a voice from a recording and its transcript.

    python examples/dialogue.py [--voice-0 A.wav "What A says."] [--voice-1 B.wav "What B says."] [--model DIR]
                                [--output dialogue.wav] [--max-audio-ms MS]
"""

import argparse

from csm_gguf import CSM
from csm_gguf.audio import write_audio

parser = argparse.ArgumentParser()
parser.add_argument("--voice-0", nargs=2, metavar=("AUDIO", "TRANSCRIPT"))
parser.add_argument("--voice-1", nargs=2, metavar=("AUDIO", "TRANSCRIPT"))
parser.add_argument("--model")
parser.add_argument("--output", default="dialogue.wav")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()

tts = CSM(args.model)
prompts = []
for speaker, voice in enumerate((args.voice_0, args.voice_1)):
    if voice:
        audio, transcript = voice
        prompts.append(tts.segment(speaker, transcript, audio=audio))
turns = [
    (0, "Did you hear that?"),
    (1, "Hear what? I was on the phone."),
    (0, "Something in the attic. It sounded like footsteps."),
    (1, "It's an old house. Old houses make noises."),
]
audio = tts.dialogue(turns, context=prompts, seed=1, max_audio_ms=args.max_audio_ms)
write_audio(args.output, audio)
print(f"written to {args.output}")
