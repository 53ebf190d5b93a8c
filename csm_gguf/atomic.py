"""Files that appear whole or not at all: written beside the target, then renamed over it."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat


def write_atomic(path: str | os.PathLike[str], data: bytes, replace: bool = True) -> None:
    """Write `data` to the file `path`. A regular file is written beside its target and renamed over it,
    so it appears whole or not at all; a symlink keeps pointing at it. Anything else (a pipe, a device
    such as /dev/null, a terminal behind /dev/stdout) is written to in place: a rename would replace it.

    A file replaced so keeps its permissions (a private file stays private), and one this process may not write
    is refused (PermissionError), as the shell's `>` refuses it: a rename would replace it all the same.

    With replace=False a file already at `path` stays, and FileExistsError is raised; the new file is
    hard-linked into place, which is atomic, so of two processes writing the same name one wins."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there yet (or a dangling link, whose target gets created)
        mode = None
    if mode is not None and not replace:
        raise FileExistsError(errno.EEXIST, "file exists", os.fspath(path))
    if mode is not None and not stat.S_ISREG(mode):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        return
    if mode is not None and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "the file is read-only", os.fspath(path))
    directory, base = os.path.split(os.path.realpath(path))
    # Unique across hosts too (a folder shared over NFS): the host's name, the process and a random part.
    tmp = os.path.join(directory, f".{base}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with 0o666 rather than mkstemp's 0o600, so the result gets the usual umask mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # name the file the caller asked for, not our temporary one
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    try:
        if mode is not None:
            os.fchmod(fd, stat.S_IMODE(mode))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = os.path.join(directory, base)
        if replace:
            os.replace(tmp, target)
        else:
            _move_new(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _move_new(tmp: str, target: str) -> None:
    """`tmp`'s file to `target`, which must not exist (FileExistsError): a hard link, then `tmp` unlinked."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        # On NFS a LINK whose reply was lost is sent again, and the retry finds the link its first try
        # made: then our file has two names. (The test open(2) gives for lock files over NFS.)
        if not (os.stat(tmp).st_nlink == 2 and os.path.samefile(tmp, target)):
            raise
    except OSError:  # a file system without hard links: check, then rename (a race is then possible)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "file exists", target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)
