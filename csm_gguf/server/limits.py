"""The server's limits, declared once: the schemas check a request's, the errors name them, and the app, the
websocket session and the engine enforce them."""

MAX_INPUT_CHARS = 4096  # text to speak, per request (and per websocket sentence not yet ended)
MAX_CONTEXT_SEGMENTS = 32
MAX_VOICE_UPLOAD = 32 * 2**20  # bytes: half a minute of 48 kHz stereo wav is 11 MB
# A speech request's body: its context audio (base64) can be the whole context, 164 s: 42 MB as 48 kHz
# stereo wav.
MAX_SPEECH_REQUEST = 64 * 2**20
MAX_SPEAKER = 1_000_000  # speaker ids: any CSM takes, within reason
# Nesting of a request's JSON: a speech request needs 5 levels (body, context, segment, codes, frame).
# Deeper JSON is refused before anything recurses through it (Python's json parser stops near 1000).
MAX_JSON_DEPTH = 32
# Prompt rows read between two frames while other requests are speaking (CSM_GGUF_PREFILL_ROWS): they pause
# for one decode of this many rows (0.24 s on 2 CPU cores at q4_k, milliseconds on a GPU) instead of a whole
# prompt; the rows of several joining requests share that decode.
PREFILL_ROWS = 32
