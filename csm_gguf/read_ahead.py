"""An iterator made in a thread of its own, a few items ahead of its consumer: a stream's frames are generated
while the frames before them are decoded (on a GPU, Mimi's step could then overlap the next frame's instead of
adding to it: CSM_GGUF_READ_AHEAD, not yet measured there; on the CPU the two contend for the cores).

The consumer sees the same items in the same order, and the producer's exception where the item would have
been. A consumer that stops early (break, close, an exception, Ctrl-C) stops the producer at its next item and
waits for it to close its iterator, so what that iterator holds (a stream's slot of the generator) is let go
before the consumer goes on."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()
POLL_S = 0.05  # a producer waiting for room looks this often whether its consumer has gone
_producing = threading.local()  # in a producer's thread: `for_thread`, the thread its items are made for


def calling_thread() -> int:
    """The thread a call is made for: the current one, or in a producer here, its consumer's. (The generator
    counts a thread's own unfinished streams by it: one held by a read-ahead counts as its consumer's, whose
    next call must fail rather than wait for a slot that stream holds.)"""
    return getattr(_producing, "for_thread", None) or threading.get_ident()


def read_ahead(items: Iterable[T], depth: int = 2, name: str = "read-ahead") -> Iterator[T]:
    """`items`, iterated in a new thread up to `depth` items ahead of the caller."""
    made: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    thread = threading.Thread(target=_produce, args=(iter(items), made, stop, calling_thread()), name=name,
                              daemon=True)
    thread.start()
    try:
        while (item := made.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _produce(items: Iterator, made: queue.Queue, stop: threading.Event, for_thread: int) -> None:
    _producing.for_thread = for_thread
    try:
        for item in items:
            if not _put(made, item, stop):
                return
        _put(made, _END, stop)
    except BaseException as e:  # handed to the consumer, raised there
        _put(made, _Failed(e), stop)
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _put(made: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` once there is room; False if the consumer has gone meanwhile."""
    while not stop.is_set():
        try:
            made.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False
