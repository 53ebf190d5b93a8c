"""python -m csm_gguf.wyoming --uri tcp://0.0.0.0:10200: CSM as a Wyoming text-to-speech server, for Home
Assistant's voice pipeline (add it with the Wyoming Protocol integration: this machine's address, port
10200). The model, voice, thread, GPU and stream settings are the HTTP server's (options here, or its
CSM_GGUF_* variables); the sampling options are `say`'s, for every request. The server itself is the
csm_gguf.wyoming_server package."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket
import sys
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from .say import add_sampling_arguments, check_sampling
from .server.settings import SETTINGS, Settings

log = logging.getLogger("csm_gguf.wyoming")
# HTTP-only settings: Wyoming has no authentication (keep the port to your network), drain or websockets.
UNUSED = {"api_key", "drain_s", "max_websockets", "ws_idle_s", "ws_ping_s"}
# Settings that mean something else here: Wyoming has no busy answer, so a full server makes a request wait.
WYOMING_HELP = {"max_queue": "requests the engine queues for a free stream (default 16); more wait their turn "
                             "too: none is refused"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csm_gguf.wyoming", description="Serve CSM-1B text to speech over "
                                "the Wyoming protocol (Home Assistant). Options override the environment.")
    p.add_argument("--uri", default="tcp://0.0.0.0:10200", help="where to listen: tcp://HOST:PORT or unix://PATH "
                   "(default: %(default)s)")
    types = {f.name: f.type for f in fields(Settings)}
    for var, name, doc in SETTINGS:
        if name not in UNUSED:
            p.add_argument("--" + name.replace("_", "-"), type=int if types[name] == "int" else str,
                           help=f"{WYOMING_HELP.get(name, doc)}; or ${var}")
    add_sampling_arguments(p)
    p.add_argument("--debug", action="store_true", help="log every event")
    return p


def reserve(uri: str) -> socket.socket | None:
    """Check --uri, and bind its TCP address now: a bad URI or a port in use is refused before the model loads
    (seconds to minutes), not as a traceback after. The socket holds the port until the server binds it."""
    parsed = urlparse(uri)
    if parsed.scheme == "unix":
        folder = Path(parsed.path).parent
        if not parsed.path or not folder.is_dir():
            raise ValueError(f"--uri {uri!r}: unix://PATH needs the path of a socket in an existing folder")
        return None
    if parsed.scheme != "tcp":
        raise ValueError(f"--uri {uri!r}: serve on tcp://HOST:PORT or unix://PATH")
    try:
        port = parsed.port
    except ValueError as e:  # not a number, or above 65535
        raise ValueError(f"--uri {uri!r}: {e}") from None
    if not parsed.hostname or port is None:
        raise ValueError(f"--uri {uri!r} lacks a host or a port: tcp://HOST:PORT, such as tcp://0.0.0.0:10200")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(parsed.hostname, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"--uri {uri!r}: cannot listen on {parsed.hostname}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own bind does
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--uri {uri}: port {port} is in use (another server?): stop that, or give another "
                             "port") from None
        raise ValueError(f"--uri {uri}: cannot listen there: {e.strerror or e}") from None
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        check_sampling(args)  # named as the options (the sampler's own messages name its fields)
        reserved = reserve(args.uri)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _load_and_serve(args, reserved)
    except KeyboardInterrupt:  # Ctrl-C while torch and the model load (once serving, it stops the server)
        print("interrupted while starting", file=sys.stderr)
        return 130
    finally:
        if reserved is not None:
            reserved.close()


def _load_and_serve(args: argparse.Namespace, reserved: socket.socket | None) -> int:
    from .sampling import Sampling
    from .server.startup import check_settings
    from .wyoming_server.service import WyomingService

    chosen = {name: getattr(args, name) for _, name, _ in SETTINGS if name not in UNUSED}
    try:
        settings = replace(Settings.from_env(), **{k: v for k, v in chosen.items() if v is not None})
        check_settings(settings)
        service = WyomingService.start(settings, Sampling(args.temperature, args.top_k, args.seed, args.max_audio_ms))
    except (ValueError, OSError) as e:
        print(f"error: {_named_as_given(str(e), chosen)}", file=sys.stderr)
        return 2
    if reserved is not None:
        reserved.close()  # the server binds the port itself, at once
    try:
        asyncio.run(serve(service, args.uri))
    except KeyboardInterrupt:
        pass
    except OSError as e:  # taken in the moment between the two binds
        print(f"error: --uri {args.uri}: {e}", file=sys.stderr)
        return 2
    finally:
        service.close()
    return 0


def _named_as_given(message: str, chosen: dict[str, object]) -> str:
    """A settings error names the environment variable; where the user gave the option instead, the option."""
    for var, name, _ in SETTINGS:
        if chosen.get(name) is not None:
            option = "--" + name.replace("_", "-")
            message = message.replace(f"{var}=", f"{option} ").replace(var, option)
    return message


async def serve(service, uri: str) -> None:
    from wyoming.server import AsyncServer

    from .wyoming_server.handler import WyomingHandler

    server = AsyncServer.from_uri(uri)
    log.info("serving %s on %s", service.tts.model.path, uri)
    await server.run(partial(WyomingHandler, service))


if __name__ == "__main__":
    sys.exit(main())
