"""Atomic file writing: a reader sees the old file or the new one, never half of one.

Files are created with the permissions the umask allows (0644 under the usual 022), as `open`
would create them: colleagues on a shared disk read a study as its owner does.

A write that fails for want of space (a full disk, a quota) becomes one line naming the file,
the space left there and the way out (DiskFull); the temporary file is removed. Temporaries a
killed process left behind are removed by remove_temporaries, when the run starts again.
"""
import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path

from convitlab.core.errors import UserError

_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
TEMPORARY_GLOB = ".*.tmp"  # what atomic_path names its temporaries: .<name>.<random>.tmp


class DiskFull(UserError):
    """A write failed for want of space: the message names the file, the space left and the way out."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def disk_full_error(path, exc: OSError, hint: str = "", directory: bool = False) -> DiskFull:
    """The one-line error for a write of `path` (a file in `path` when `directory`) that failed
    with ENOSPC or EDQUOT."""
    path = Path(path)
    where = path if directory else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        left = f"{human_bytes(shutil.disk_usage(where).free)} left on {_mount_point(where)}"
    except OSError:
        left = "space left unknown"
    what = f"a file in {path}" if directory else str(path)
    return DiskFull(f"{_NO_SPACE.get(exc.errno, 'no space left')} writing {what} ({left}): free some space there"
                    f"{hint}, then run the same command again (a run resumes from its last checkpoint)")


@contextlib.contextmanager
def reporting_disk_full(path, hint: str = ""):
    """Turn a failed write for want of space inside the block into DiskFull naming `path`."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc, hint) from None
        raise


def find_disk_full(exc: BaseException, directory="."):
    """The DiskFull behind `exc` (itself, or what it interrupted, e.g. a log flush failing in a
    `finally` after the first write failed); a bare ENOSPC without a file name is reported as a
    write in `directory`. None when space was not the problem."""
    seen, bare = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc
        if bare is None and is_disk_full(exc):
            bare = exc
        exc = exc.__context__ or exc.__cause__
    if bare is None:
        return None
    if bare.filename:
        return disk_full_error(bare.filename, bare)
    return disk_full_error(directory, bare, directory=True)


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read 1 MiB at a time (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)  # integrity checks, not secrets: MD5 too under FIPS
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _create_temporary(path: Path) -> str:
    """A new empty file beside `path`, named as TEMPORARY_GLOB says. Not tempfile.mkstemp: it
    creates files 0600 whatever the umask, and the rename would carry that mode to `path`."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
            return str(tmp)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    with reporting_disk_full(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_temporaries(directory) -> list:
    """Remove the temporaries of atomic writes a killed process left in `directory`; returns them.
    Only for a directory no other process writes to (a run directory under its lock)."""
    removed = []
    for path in sorted(Path(directory).glob(TEMPORARY_GLOB)):
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
