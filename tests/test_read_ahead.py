"""read_ahead: an iterator made in its own thread, as the consumer would have made it in its own."""

from __future__ import annotations

import threading

import pytest

from csm_gguf.read_ahead import read_ahead


class Made:
    """An iterator that records which thread made each item and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at
        self.threads: set[str] = set()
        self.closed = threading.Event()

    def __iter__(self):
        try:
            for i in range(self.n):
                self.threads.add(threading.current_thread().name)
                if i == self.fail_at:
                    raise ValueError(f"item {i} failed")
                yield i
        finally:
            self.closed.set()


def test_the_items_in_order_made_in_another_thread():
    made = Made(50)
    assert list(read_ahead(iter(made), depth=2, name="maker")) == list(range(50))
    assert made.threads == {"maker"}


def test_the_producers_error_is_raised_where_its_item_would_have_been():
    got = []
    with pytest.raises(ValueError, match="item 3 failed"):
        for item in read_ahead(iter(Made(10, fail_at=3))):
            got.append(item)
    assert got == [0, 1, 2]


def test_a_consumer_that_stops_early_has_the_iterator_closed_before_it_goes_on():
    made = Made(1000)
    items = read_ahead(iter(made), depth=2)
    assert next(items) == 0
    items.close()  # as a break, or a stream's consumer that leaves
    assert made.closed.is_set()  # what it held (a generator's slot) is let go already
    assert not any(t.name == "read-ahead" for t in threading.enumerate())


def test_a_consumer_error_stops_the_producer():
    made = Made(1000)
    with pytest.raises(KeyError):
        for item in read_ahead(iter(made)):
            if item == 5:
                raise KeyError(item)
    assert made.closed.is_set()
