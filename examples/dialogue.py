"""A conversation: each turn is spoken after what was said before it, so CSM keeps the two voices apart
and answers in tone. The speakers talk in built-in voices (nova and echo), or give either a voice from a
recording and its transcript.

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
who = ["nova", "echo"]  # a turn's speaker: a voice's name, or a speaker id heard in the context
for speaker, voice in enumerate((args.voice_0, args.voice_1)):
    if voice:
        audio, transcript = voice
        prompts.append(tts.segment(speaker, transcript, audio=audio))
        who[speaker] = speaker
turns = [
    (who[0], "Did you hear that?"),
    (who[1], "Hear what? I was on the phone."),
    (who[0], "Something in the attic. It sounded like footsteps."),
    (who[1], "It's an old house. Old houses make noises."),
]
audio = tts.dialogue(turns, context=prompts, seed=1, max_audio_ms=args.max_audio_ms)
write_audio(args.output, audio)
print(f"written to {args.output}")
