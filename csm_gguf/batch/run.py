"""One batch run: read the rows, skip those already done, make the rest on Ray, write each file and its
manifest line as it comes back, and sum it up."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Iterable

from ..sampling import TEMPERATURE, TOP_K, Sampling
from .manifest import Manifest, audio_path, write_ljspeech
from .pipeline import Pool, check_address, import_ray, made_rows, ray_session
from .rows import InputError, Row, read_rows
from .tally import Summary, Tally
from .voices import load_voices, row_voice
from .worker import failed

METADATA_LAYOUTS = ("ljspeech",)


def row_seed(run_seed: int, row_id: str) -> int:
    """A row's seed from the run's and its id alone, whichever worker makes it, in any order (the same speech
    where its steps are not shared with other rows: --streams 1)."""
    digest = hashlib.blake2b(f"{run_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


def synthesize(
    input: str | Path | Iterable[Any],
    output_dir: str | Path,
    *,
    model: str | Path | None = None,
    format: str = "wav",
    voice: str | None = None,
    speaker: int | None = None,
    temperature: float = TEMPERATURE.default,
    top_k: int = TOP_K.default,
    seed: int = 0,
    max_audio_ms: float | None = None,
    workers: int = 1,
    streams: int = 4,
    threads: int = 0,
    gpu_layers: int = 0,
    gpus: float = 0,
    kv_type: str = "f16",
    address: str | None = None,
    metadata: str | None = None,
    progress: bool = True,
) -> Summary:
    """Speak every row of `input` (a .txt, .jsonl or .csv file, or a list of texts or dicts) into `output_dir`:
    one audio file per row and a line in manifest.jsonl. Rows already done there are skipped. Raises
    InputError for a malformed input, ValueError for bad settings; a row that cannot be spoken gets its error
    in the manifest instead. See `python -m csm_gguf.batch --help` for the settings."""
    from ..model_dir import check_model_dir
    from ..tts import find_model
    from ..voices import NO_VOICE, voice_speaker

    start = time.perf_counter()
    fmt = check_settings(format, speaker, temperature, top_k, seed, max_audio_ms, workers, threads, metadata)
    check_worker(threads, gpu_layers, streams, gpus, address)
    if not str(output_dir):
        raise InputError("the output folder is empty: give a folder (made if need be)")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise InputError(f"the output folder {output_dir} is a file: give a folder (made if need be)")
    if voice is not None and voice != NO_VOICE:
        voice_speaker(voice)  # the run's own voice known and readable: now, not as every row's error
    rows = read_rows(input)
    pool = Pool(str(check_model_dir(find_model(model)).resolve()), workers, streams, threads, gpu_layers, gpus, kv_type,
                address)
    import_ray()  # now, not after the output folder is made
    check_address(address)
    voices, voice_errors = load_voices({row_voice(row, voice, speaker) for row in rows}, pool)
    entries = {row.id: entry(row, voice, speaker, seed, voices, fmt, metadata) for row in rows}
    folder = Path(output_dir)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _run(rows, entries, folder, pool, fmt, voices, voice_errors, temperature, top_k, max_audio_ms, metadata,
                    progress, start)
    except BaseException:
        if made and not any(folder.iterdir()):  # nothing written (Ray would not start): no folder left either
            folder.rmdir()
        raise


def _run(rows: list[Row], entries: dict[str, dict], folder: Path, pool: Pool, fmt: str, voices: dict[str, Any],
         voice_errors: dict[str, str], temperature: float, top_k: int, max_audio_ms: float | None,
         metadata: str | None, progress: bool, start: float) -> Summary:
    manifest = Manifest(folder)
    done_before = manifest.resume(entries)
    todo = [e for e in entries.values() if e["id"] not in done_before]
    tally = Tally(len(rows), len(done_before), manifest, len(todo), progress)
    try:
        for e in todo:
            if e["voice"] in voice_errors:
                tally.add(failed(e, voice_errors[e["voice"]]), None)
        todo = [e for e in todo if e["voice"] not in voice_errors]
        if todo:
            sampling = Sampling(temperature, top_k, None, max_audio_ms)  # each row's seed its own
            with ray_session(pool):
                for made, audio in made_rows(todo, pool, fmt, sampling, voices):
                    tally.add(made, audio)
    finally:
        tally.close()
    if metadata == "ljspeech":
        order = {row.id: i for i, row in enumerate(rows)}
        write_ljspeech(folder, sorted((e for e in manifest.read() if e["id"] in order), key=lambda e: order[e["id"]]))
    return tally.summary(time.perf_counter() - start)


def check_worker(threads: int, gpu_layers: int, streams: int, gpus: float, address: str | None) -> None:
    """A worker's numbers, checked as its CSM will check them, but before Ray starts (a worker's own checks fail
    inside Ray, as a traceback)."""
    from ..generator import check_options

    names = {"n_threads": "threads (--threads)", "n_gpu_layers": "gpu_layers (--gpu-layers)",
             "max_streams": "streams (--streams)"}
    check_options(threads if address is None else 0, gpu_layers, streams, names)  # a cluster's nodes: their cores
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not gpus >= 0:
        raise ValueError(f"gpus (--gpus) must be a number >= 0, got {gpus!r}")


def check_settings(fmt: str, speaker: int | None, temperature: float, top_k: int, seed: int,
                   max_audio_ms: float | None, workers: int, threads: int, metadata: str | None) -> str:
    """The format, once every setting is checked (before anything loads)."""
    from ..audio import check_format
    from ..generator import Sampling, check_speaker

    Sampling(temperature, top_k, seed, 1.0 if max_audio_ms is None else max_audio_ms)  # its checks and messages
    if speaker is not None:
        check_speaker(speaker)
    for name, value, least in (("workers", workers, 1), ("threads", threads, 0)):  # the rest: check_worker
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} (--{name}) must be a whole number >= {least}, got {value!r}")
    if metadata is not None and metadata not in METADATA_LAYOUTS:
        raise ValueError(f"unknown metadata layout {metadata!r}; known: {', '.join(METADATA_LAYOUTS)}")
    if metadata == "ljspeech" and fmt != "wav":
        raise ValueError(f"the LJSpeech layout holds wav files (wavs/<id>.wav), not {fmt}: leave the format wav")
    return check_format(fmt)


def entry(row: Row, default_voice: str | None, default_speaker: int | None, run_seed: int, voices: dict,
          fmt: str, metadata: str | None) -> dict:
    """The row as its manifest line begins: what is said, how, and where it goes."""
    voice = row_voice(row, default_voice, default_speaker)
    speaker = row.speaker if row.speaker is not None else default_speaker
    if speaker is None:
        speaker = voices[voice].speaker if voice in voices else 0
    seed = row.seed if row.seed is not None else row_seed(run_seed, row.id)
    return dict(id=row.id, text=row.text, voice=voice, speaker=speaker, seed=seed,
                path=audio_path(row.id, fmt, metadata))
