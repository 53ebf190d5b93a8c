"""The answer to `describe`: one text-to-speech program and its voices, the built-in and the saved ones."""

from __future__ import annotations

import os

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from .. import __version__
from ..voices import all_voices, describe

NAME = "csm-gguf"
ATTRIBUTION = Attribution(name="Sesame (CSM-1B) and Kyutai (Mimi codec); csm-gguf",
                          url="https://github.com/SesameAILabs/csm")
LANGUAGES = ["en"]  # CSM-1B was trained on English


def voice_descriptions(model_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(name, one line on it) for every voice, as GET /v1/audio/voices lists them: built-in voices (their
    prompts as the model in `model_dir` made them) and saved ones; not "none", the raw model, which a
    request may still name. Home Assistant shows the line."""
    return [(name, describe(name, model_dir)) for name in all_voices()]


def tts_info(model_dir: str | os.PathLike | None = None) -> Info:
    """Read afresh for each `describe`: voices saved meanwhile (say --save-voice, the HTTP server) are listed."""
    voices = [TtsVoice(name=name, attribution=ATTRIBUTION, installed=True, description=line, version=None,
                       languages=LANGUAGES) for name, line in voice_descriptions(model_dir)]
    program = TtsProgram(name=NAME, attribution=ATTRIBUTION, installed=True, version=__version__,
                         description="Sesame's Conversational Speech Model (CSM-1B) on llama.cpp",
                         voices=voices, supports_synthesize_streaming=True)
    return Info(tts=[program])
