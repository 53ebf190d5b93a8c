"""Speak a whole corpus: `python -m csm_gguf.batch INPUT --output-dir DIR`, or from Python:

    from csm_gguf.batch import synthesize
    summary = synthesize("lines.jsonl", "out/", workers=2, streams=4, voice="narrator")

Rows are made on Ray Data (an optional extra: pip install 'csm-gguf[batch]'), started inside the process or
joined with `address=`. Modules: rows (reading the input), manifest (the output folder, resume), worker (the
Ray actor: model and engine), pipeline (Ray), tally (progress and summary), run (one run), cli.
"""

from .rows import InputError, Row, read_rows
from .run import row_seed, synthesize
from .tally import Summary

__all__ = ["InputError", "Row", "Summary", "read_rows", "row_seed", "synthesize"]
