"""What each piece of a text hears, recorded by wrapping the piece plan's `Context.fitting`."""

from __future__ import annotations

from csm_gguf.plan import Context


def spy_on_contexts(monkeypatch) -> list[list]:
    """The segments each piece hears (the caller's, then what was said before it), from now on."""
    contexts: list[list] = []
    fitting = Context.fitting

    def spy(self, piece):
        heard = fitting(self, piece)
        contexts.append([h.segment for h in heard])
        return heard

    monkeypatch.setattr(Context, "fitting", spy)
    return contexts
