"""Atomic file writes and hashing: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a rename or a new entry in ``path`` (POSIX needs the directory fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``Path(path).write_bytes(data)``, through the test-only disk budget below."""
    with open(path, "wb") as f:
        _write(f, data, path)


def _write(f, data: bytes, path: str | os.PathLike) -> None:
    """``f.write(data)``. Test-only hook, unset in real use: ``EDGEFT_TEST_DISK_BYTES=N`` lets this
    process write N bytes through here in all; the write that crosses it writes what fits and then
    fails as a full disk does (OSError ENOSPC), so tests/test_crash_safety.py can fill the disk
    without mounting a small filesystem."""
    global _test_bytes_written
    budget = os.environ.get("EDGEFT_TEST_DISK_BYTES")
    if budget is not None:
        room = max(0, int(budget) - _test_bytes_written)
        if len(data) > room:
            f.write(data[:room])
            _test_bytes_written += room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        _test_bytes_written += len(data)
    f.write(data)


_test_bytes_written = 0


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make bundles unreadable to others
        with os.fdopen(fd, "wb") as f:
            _write(f, data, path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """True for "no space left" / "quota exceeded", including safetensors' writer, which wraps the
    OS error in a SafetensorError whose text ends in ``(os error 28)``."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    from safetensors import SafetensorError  # lazy: keeps this module import-light

    return isinstance(exc, SafetensorError) and any(f"(os error {n})" in str(exc) for n in DISK_FULL_ERRNOS)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: str | os.PathLike) -> None:
    """Give a staged tree normal permissions and fsync every file and directory in it, so it
    can be renamed into place complete (mkdtemp/mkstemp create 0700/0600 entries)."""
    mask = _umask()
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fchmod(fd, 0o666 & ~mask)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory out of sight, then put it in place of ``path`` in one rename.

    Yields an empty hidden directory beside ``path``. If the block succeeds, the tree is fsynced
    and swapped in (an existing ``path`` is set aside until the new one is in, then removed); if
    it fails, the staging directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        fsync_tree(staging)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        fsync_dir(path.parent)  # both renames durable before the old copy goes
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
