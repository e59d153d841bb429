"""File-system helpers that every writer shares: OS errors in plain words, permissions of new files, fsync."""

from __future__ import annotations

import errno
import os
from pathlib import Path

_ERRNO_WORDS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (read-only folder?)",
    errno.EPERM: "permission denied (read-only folder?)",
}


def os_error_text(exc: BaseException) -> str:
    """Plain words for an OS error (``the disk is full`` rather than ``[Errno 28]``), also inside safetensors' errors."""
    if isinstance(exc, OSError) and exc.errno in _ERRNO_WORDS:
        return _ERRNO_WORDS[exc.errno]
    if "os error 28" in str(exc):  # safetensors reports the errno only in its text
        return _ERRNO_WORDS[errno.ENOSPC]
    return str(exc) or type(exc).__name__


def permissions_of_new_files(path: Path) -> None:
    """Give a file, or a folder and all it holds, the permissions the umask gives any new one: mkstemp and
    mkdtemp make them owner-only, which a web server or serving engine running as another user cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (folders: so that the renames inside survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
