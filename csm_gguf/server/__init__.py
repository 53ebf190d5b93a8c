"""The OpenAI-compatible speech server, in parts: settings, errors, request schemas, the engine
(continuous batching), the HTTP streaming encoders, the websocket session, the routes and the app.

Light on purpose: importing this package imports neither flask nor torch, so code that serves speech
another way (a batch runner, a Wyoming server) can use `csm_gguf.server.engine` alone.
"""
