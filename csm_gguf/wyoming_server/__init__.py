"""CSM as a Wyoming text-to-speech server (Home Assistant's local voice pipeline), in parts: reading
events (events), the info answer (info), the model and engine behind a few functions (service), the
audio of a connection spoken in order (speaker), and the event handler (handler). The entry point is
csm_gguf.wyoming; the engine, its settings and the voices are the HTTP server's (csm_gguf.server)."""
