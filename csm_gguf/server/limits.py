"""The server's limits, declared once: the schemas check a request's, the errors name them, and the app, the
websocket session and the engine enforce them."""

MAX_INPUT_CHARS = 4096  # text to speak, per request (and per websocket sentence not yet ended)
# A websocket session's text received and not yet being spoken (over an hour of speech). Beyond, a message's text
# is refused: the client cannot be slowed instead (simple_websocket's reader takes every message as it comes).
MAX_WS_WAITING_CHARS = 16 * MAX_INPUT_CHARS
MAX_CONTEXT_SEGMENTS = 32
MAX_VOICE_UPLOAD = 32 * 2**20  # bytes: half a minute of 48 kHz stereo wav is 11 MB
# A speech request's body: its context audio (base64) can be the whole context, 164 s: 42 MB as 48 kHz
# stereo wav.
MAX_SPEECH_REQUEST = 64 * 2**20
MAX_SPEAKER = 1_000_000  # speaker ids: any CSM takes, within reason
# Nesting of a request's JSON: a speech request needs 5 levels (body, context, segment, codes, frame).
# Deeper JSON is refused before anything recurses through it (Python's json parser stops near 1000).
MAX_JSON_DEPTH = 32
# A client that takes none of the audio sent to it for this long is dropped (a send's timeout): it would
# hold its thread, and a websocket its slot, for ever. Well above a player's pauses between reads.
STALLED_CLIENT_S = 60.0
# A refused request's body (a 429 or 503 before it was read) read and dropped up to this, so its connection
# serves the client's next request; a larger one is left and the connection closed.
DRAIN_REFUSED_BODY = 1 << 20
# Prompt rows read between two frames while other requests are speaking (CSM_GGUF_PREFILL_ROWS; 0: by device):
# they pause for one decode of this many rows instead of a whole prompt, and the rows of several joining
# requests share that decode. On the CPU, where each row costs its arithmetic, 32 (0.24 s on 2 cores at q4_k).
# With the layers on a GPU a whole batch of the backbone: there a decode's rows cost little beside its launches
# and its reading of the weights (on the CPU, with the tiny test model, whose rows are as cheap, 64 requests
# sent at once had their median first audio 3-6x sooner with 512 than with 32: docs/performance.md).
PREFILL_ROWS_CPU, PREFILL_ROWS_GPU = 32, 512
