"""The answer to `describe`: one text-to-speech program and its voices, the built-in and the saved ones."""

from __future__ import annotations

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from .. import __version__
from ..server.schemas import voice_names
from ..voices import BUILTIN_VOICES, describe

NAME = "csm-gguf"
ATTRIBUTION = Attribution(name="Sesame (CSM-1B) and Kyutai (Mimi codec); csm-gguf",
                          url="https://github.com/SesameAILabs/csm")
LANGUAGES = ["en"]  # CSM-1B was trained on English


def voice_descriptions() -> list[tuple[str, str]]:
    """(name, one line on it) for every voice a request may name. Home Assistant shows the line."""
    return [(name, f"{name} (built-in: CSM speaker {BUILTIN_VOICES[name]}, no voice prompt)"
             if name in BUILTIN_VOICES else describe(name)) for name in voice_names()]


def tts_info() -> Info:
    """Read afresh for each `describe`: voices saved meanwhile (say --save-voice, the HTTP server) are listed."""
    voices = [TtsVoice(name=name, attribution=ATTRIBUTION, installed=True, description=line, version=None,
                       languages=LANGUAGES) for name, line in voice_descriptions()]
    program = TtsProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=__version__,
                         description="Sesame's Conversational Speech Model (CSM-1B) on llama.cpp",
                         voices=voices, supports_synthesize_streaming=True)
    return Info(tts=[program])
