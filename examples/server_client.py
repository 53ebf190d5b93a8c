"""Talk to a running csm-gguf server with OpenAI's own client: save a voice from a recording, speak in it.

    flask --app csm_gguf.web run                      # in another terminal (CSM_GGUF_MODEL=... to pick a model)
    python examples/server_client.py REFERENCE.wav "What the reference says." [--base-url URL] [--output out.mp3]
                                     [--max-audio-ms MS]
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("reference_audio")
parser.add_argument("transcript")
parser.add_argument("--base-url", default="http://127.0.0.1:5000/v1")
parser.add_argument("--output", default="out.mp3")
parser.add_argument("--max-audio-ms", type=float)
args = parser.parse_args()

client = OpenAI(base_url=args.base_url, api_key="unused")  # or the server's CSM_GGUF_API_KEY
with open(args.reference_audio, "rb") as sample:
    # CSM reads a voice prompt together with its words: the transcript goes along (extra_body).
    # A name of its own: a run cut short before the delete below leaves its voice behind.
    voice = client.audio.voices.create(name=f"example-{os.getpid()}", audio_sample=sample, consent="not-checked",
                                       extra_body={"transcript": args.transcript})
try:
    extra = {"max_audio_ms": args.max_audio_ms} if args.max_audio_ms else {}
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", voice=voice.id, input="This sentence is spoken in the saved voice.",
        response_format="mp3", extra_body=extra,
    ) as response:
        response.stream_to_file(args.output)  # written as it streams in
    print(f"written to {args.output}")
finally:
    client.audio.voices.delete(voice.id)
