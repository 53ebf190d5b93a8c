"""llama.py: the llama.cpp model wrapper's own behaviours."""

from __future__ import annotations

import signal

import llama_cpp as L
import pytest

from csm_gguf import llama
from csm_gguf.llama import ContextOptions, EmbeddingModel


def _loading_calls(monkeypatch, interrupt_at: int | None) -> list[float]:
    """Progress reports of one load of a backbone, SIGINT raised (as Ctrl-C would) at report `interrupt_at`."""
    calls: list[float] = []
    real = llama._progress

    @L.llama_progress_callback
    def progress(fraction: float, user_data) -> bool:
        calls.append(fraction)
        if len(calls) == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return real(fraction, user_data)

    monkeypatch.setattr(llama, "_progress", progress)
    return calls


def test_ctrl_c_while_a_model_loads_stops_the_load(f32_model, monkeypatch):
    """Ctrl-C lands in a ctypes callback while llama.cpp loads (the only Python code running then), where ctypes
    used to print KeyboardInterrupt and drop it: the load, and the program, went on."""
    # A load is interruptible only while SIGINT has Python's default handler (llama.interruptible). A process
    # started in the background by a shell without job control (`cmd &`) inherits SIGINT ignored: no Ctrl-C there.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored in this process (started in the background): there is no Ctrl-C to test")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)
    path, opts = f32_model / "backbone.gguf", ContextOptions(n_ctx=64, n_batch=8)
    whole = _loading_calls(monkeypatch, None)
    EmbeddingModel(path, opts).close()
    assert len(whole) > 3
    calls = _loading_calls(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingModel(path, opts)
    assert len(calls) < len(whole)  # stopped, not finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    EmbeddingModel(path, opts).close()  # and the next load is not stopped by the last one's interrupt
