"""CSM-1B text-to-speech on llama.cpp from GGUF files."""
