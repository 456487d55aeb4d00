"""A full disk, for a test that runs the real entry point (PYTHONPATH=tests/faults).

With CONVITLAB_TEST_FULL_DISK=<text>, every write to a file whose path contains <text> fails
with ENOSPC, as on a full disk; the file is created (empty), as it would be. Python code that
writes through open() (paddle.save, pickle.dump, pathlib) meets it; nothing else is changed.
"""
import builtins
import errno
import io
import os

_TRIGGER = os.environ.get("CONVITLAB_TEST_FULL_DISK")


class _FullDiskFile:
    def __init__(self, file):
        self._file = file

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writelines(self, lines):
        self.write(b"")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
        return False


if _TRIGGER:
    _open = builtins.open

    def _open_on_a_full_disk(file, mode="r", *args, **kwargs):
        opened = _open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        if writing and isinstance(file, (str, bytes, os.PathLike)) and _TRIGGER in os.fsdecode(file):
            return _FullDiskFile(opened)
        return opened

    builtins.open = io.open = _open_on_a_full_disk
