"""Reading a client's Wyoming events, where a line that is not an event is answered, not the end.

wyoming.event.async_read_event returns None for a line that is not JSON, which its handler takes for the
client leaving; a JSON line that is not an object raises out of it. Here both are a BadEvent, and the
connection goes on with the next line. A header's data and payload are read (or skipped, past the
limits) whatever else is wrong with it, so that the next event is found where it starts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

MAX_DATA = 1 << 16  # bytes of an event's extra data: a text to speak is at most a few kB
MAX_PAYLOAD = 1 << 20  # a text-to-speech server reads no payloads; a larger one is skipped
_SKIP = 1 << 16


class BadEvent(ValueError):
    """A line or an event that is not Wyoming; the connection goes on."""


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, None when the client has gone (or closed its side); BadEvent for one that is not."""
    line = await _line(reader)
    if not line:
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise BadEvent("not a Wyoming event: each event starts with a line of JSON, such as "
                       '{"type": "describe"}') from None
    if not isinstance(header, dict):
        raise BadEvent("not a Wyoming event: its header line must be a JSON object")
    data_length, payload_length = _length(header, "data_length"), _length(header, "payload_length")
    try:
        data = await _take(reader, data_length, MAX_DATA)
        payload = await _take(reader, payload_length, MAX_PAYLOAD)
    except asyncio.IncompleteReadError:  # the client left half-way through an event
        return None
    if data is None or payload is None:
        raise BadEvent(f"an event's data ({data_length} bytes) or payload ({payload_length} bytes) is more than "
                       f"this server reads ({MAX_DATA} and {MAX_PAYLOAD})")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadEvent("not a Wyoming event: its header needs a 'type', such as \"synthesize\"")
    return Event(type=kind, data={**_object(header.get("data", {}), kind), **_object(data or b"{}", kind)},
                 payload=payload or None)


async def _line(reader: asyncio.StreamReader) -> bytes:
    """The next line (b"" at the end); BadEvent for one past the reader's limit, dropped to its end: what
    readline leaves of it would be read as lines of their own, each another error."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:  # the last line, without its end
        return e.partial
    except asyncio.LimitOverrunError as e:
        dropped = e.consumed
        while True:
            try:
                await reader.readexactly(dropped)
                await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as more:  # the line goes on
                dropped = more.consumed
            except asyncio.IncompleteReadError:  # the client left within it
                break
        raise BadEvent("an event's header line is too long (at most 64 KiB)") from None


def _length(header: dict, key: str) -> int:
    value = header.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:  # where the next event starts is lost
        raise BadEvent(f"{key} must be a whole number of bytes, got {value!r}")
    return value


async def _take(reader: asyncio.StreamReader, length: int, limit: int) -> bytes | None:
    """`length` bytes; None when they are more than `limit` (read and dropped, a piece at a time)."""
    if length <= limit:
        return await reader.readexactly(length)
    while length:
        length -= len(await reader.readexactly(min(length, _SKIP)))
    return None


def _object(data: bytes | dict, kind: str) -> dict[str, Any]:
    if isinstance(data, bytes):
        try:
            data = json.loads(data)
        except ValueError:
            data = None
    if not isinstance(data, dict):
        raise BadEvent(f"{kind}: its data must be a JSON object")
    return data
