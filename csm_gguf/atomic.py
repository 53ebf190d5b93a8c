"""Files that appear whole or not at all: written beside the target, then renamed over it."""

from __future__ import annotations

import os
import secrets


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 rather than mkstemp's 0o600, so the result gets the usual umask mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # name the file the caller asked for, not our temporary one
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
