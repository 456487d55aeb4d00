"""One run directory, one run: a lock that names its holder.

`<run dir>/.lock` is held with flock(2) by the process that trains there (rank 0 of a
distributed launch) and says who it is: process, host, since when, the command, and which
distributed launch it belongs to. A second process finds it held and refuses in one line
naming the holder, before writing anything (the entry point takes the lock before Hydra
writes its .hydra/ record and log). The kernel drops an flock when its process dies however it
dies, so a lock left by a killed run is free and is taken over, with a log line.

The run directory itself is flocked too, first (_lock_directory): the lock file is a name
anyone can delete while its run runs, and a second process would then lock a new file and train
beside the first; the directory's lock goes only with the process. The file still names the
holder, and decides alone where a directory cannot be locked (NFS).

Ranks r > 0 of the launch do not take it: they wait until the file names their own launch
(PADDLE_MASTER and the trainer endpoints, the same on every rank and node), then share it.

Shared file systems: flock works across the nodes of an NFS or GPFS mount, and of Lustre mounted
with `flock`. Where file locks are not supported at all, the file alone decides: a holder on
this host is alive while its process is (pid and start time), one on another host until
STALE_AFTER_S after its last heartbeat (it touches the file every HEARTBEAT_S).

Not the filelock package: it cannot lock a directory, its 3.x releases truncate the lock file
(the holder's record) on every attempt to take it, and it treats ENOLCK (NFS without its lock
daemon) as a lock held by someone else or as an error, not as "no file locks here".
"""
import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

from convitlab.core import distributed, tables
from convitlab.core.errors import UserError
from convitlab.core.files import reporting_disk_full
from convitlab.core.layout import RunFolder, check_run_dir
from convitlab.core.processes import process_start

log = logging.getLogger(__name__)
HEARTBEAT_S = 30
STALE_AFTER_S = 180
RANK_WAIT_S = 600  # how long ranks r > 0 wait for rank 0 of their launch to take the lock
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_held = {}  # resolved run dir -> the RunLock this process holds (or shares) on it


def _key(run_dir) -> str:
    """The run directory as _held knows it (os.path.realpath: a symbolic link loop is check_run_dir's to report)."""
    return os.path.realpath(run_dir)


class RunDirInUse(UserError):
    """Another process (not of this launch) holds the run directory; holder_text names it."""

    def __init__(self, message: str, holder_text: str = "another process"):
        super().__init__(message)
        self.holder_text = holder_text


def launch_id():
    """What every rank of one paddle.distributed launch has in common (None for one process):
    its master and trainer endpoints, whose ports a second launch alongside cannot reuse."""
    if distributed.world_size() <= 1:
        return None
    key = f"{os.environ.get('PADDLE_MASTER', '')}|{os.environ.get('PADDLE_TRAINER_ENDPOINTS', '')}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def describe(holder: dict) -> str:
    if not holder:
        return "another process (its lock file names no holder yet)"
    text = f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


class RunLock:
    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = RunFolder(run_dir).lock
        self.fd = None
        self.dir_fd = None         # the run directory, flocked (_lock_directory)
        self.shared = False        # a rank r > 0 sharing rank 0's lock
        self.taken_over = None     # the holder whose stale lock was taken over, for the log
        self.owner = os.getpid()   # a forked child (a data loader worker) must not release it
        self._stop = threading.Event()

    # --- reading the holder -------------------------------------------------------------------

    def holder(self, fd=None, attempts: int = 10) -> dict:
        """The holder the lock file names ({} if none); retried while it is being written."""
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.05)
            try:
                text = os.pread(fd, 1 << 16, 0).decode() if fd is not None else self.path.read_text()
            except OSError:  # gone, or unreadable: it names no one
                return {}
            with contextlib.suppress(ValueError):  # half-written: read it again
                holder = json.loads(text) if text.strip() else {}
                if isinstance(holder, dict):
                    return holder
        return {}

    def _heartbeat_age(self, fd=None) -> float:
        try:
            mtime = os.fstat(fd).st_mtime if fd is not None else self.path.stat().st_mtime
        except OSError:
            return float("inf")
        return time.time() - mtime

    def _alive(self, holder: dict, fd=None) -> bool:
        """Whether the holder a lock file names still runs, where file locks cannot say."""
        if not holder or holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return False
        if holder.get("host") == socket.gethostname():
            start = process_start(int(holder.get("pid", 0)))
            return start is not None and start == holder.get("start")
        return self._heartbeat_age(fd) < STALE_AFTER_S

    def _in_use(self, holder: dict, fd=None, by_heartbeat: bool = False, deleted: bool = False) -> RunDirInUse:
        who = (f"another process (its {self.path.name} file, which names it, was deleted)" if deleted
               else describe(holder))
        stale = (f"; without file locks here, it is presumed gone {STALE_AFTER_S} s after its last heartbeat "
                 f"({self._heartbeat_age(fd):.0f} s ago)"
                 if by_heartbeat and holder.get("host") != socket.gethostname() else "")
        return RunDirInUse(f"run directory {self.run_dir} is in use by {who}: wait for that run to end or stop it "
                           f"(it resumes where it stopped); to run alongside, choose another hydra.run.dir{stale}", who)

    # --- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> "RunLock":
        """Hold the run directory for this process until it exits (or release()); RunDirInUse if
        another process holds it. Held already by this process: that same lock."""
        check_run_dir(self.run_dir)
        key = _key(self.run_dir)
        if key in _held:
            return _held[key]
        if distributed.rank() > 0 and launch_id() is not None:
            self._join_launch()
        else:
            self._take()
        _held[key] = self
        atexit.register(self.release)
        return self

    def _take(self) -> None:
        with self._writable():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        try:
            self._take_file()
        except BaseException:
            self._unlock_directory()
            raise

    def _lock_directory(self) -> None:
        """flock the run directory itself (why: the module's docstring); RunDirInUse if another process has it."""
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise self._in_use(holder, deleted=not holder and not os.path.lexists(self.path)) from None
        except OSError as exc:
            os.close(fd)
            # NFS locks a file only when it is open for writing, which a directory cannot be (EBADF):
            # there the lock file alone decides.
            if exc.errno not in (*_NO_LOCKING, errno.EBADF):
                raise
            return
        self.dir_fd = fd

    def _unlock_directory(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)  # closing the last descriptor of it drops the flock
            self.dir_fd = None

    def _take_file(self) -> None:
        for _ in range(20):  # another process may remove the file between our open and lock
            with self._writable():
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            locking = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as exc:
                if exc.errno not in _NO_LOCKING:
                    os.close(fd)
                    raise
                locking = False  # no file locks here: the holder's liveness decides alone
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder had just removed: try the new one
                os.close(fd)
                continue
            holder = self.holder(fd, attempts=1 if locking else 10)
            if not locking:
                if self._alive(holder, fd):
                    error = self._in_use(holder, fd, by_heartbeat=True)
                    os.close(fd)
                    raise error
                log.warning("file locks are not supported in %s: two runs there are told apart by the lock "
                            "file alone (its holder's process or heartbeat)", self.run_dir)
            self.taken_over = holder or None
            self.fd = fd
            try:
                self._write_holder()
            except BaseException:  # e.g. no space left for it: the lock is not kept
                os.close(fd)
                self.fd = None
                raise
            threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()
            return
        raise RunDirInUse(f"run directory {self.run_dir}: its lock file keeps changing; another process is "
                          "starting there")

    @contextlib.contextmanager
    def _writable(self):
        """Turn a run directory that cannot be written (a read-only file system, no permission) into
        one line; nothing can have been written there."""
        try:
            with reporting_disk_full(self.path):
                yield
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:
                raise
            previous = tables.read_result(self.run_dir)
            kept = f" (its result.csv says {previous.get('status')}: read it where it is)" if previous else ""
            raise UserError(f"cannot write in run directory {self.run_dir} ({os.strerror(exc.errno)}){kept}: "
                            "choose a hydra.run.dir on a file system you can write to") from None

    def _write_holder(self) -> None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "start": process_start(os.getpid()), "launch": launch_id(),
                  "command": shlex.join([os.path.basename(sys.executable), *sys.argv])[:1000]}
        data = json.dumps(holder).encode()
        with reporting_disk_full(self.path):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
            os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError, TypeError):
                os.utime(self.fd)

    def _join_launch(self, wait_s: float = None) -> None:
        """Rank r > 0: share the lock once rank 0 of this launch holds it."""
        launch = launch_id()
        deadline = time.time() + (RANK_WAIT_S if wait_s is None else wait_s)
        while True:
            holder = self.holder()
            if holder.get("launch") == launch:
                self.shared = True
                return
            if time.time() > deadline:
                raise RunDirInUse(f"rank {distributed.rank()}: rank 0 of this launch did not take the lock of "
                                  f"{self.run_dir} within {RANK_WAIT_S} s (it names {describe(holder)})")
            time.sleep(0.2)

    def release(self) -> None:
        if os.getpid() != self.owner:
            return
        self._stop.set()
        atexit.unregister(self.release)
        _held.pop(_key(self.run_dir), None)
        if self.fd is None:
            self._unlock_directory()
            return
        with contextlib.suppress(OSError):  # removed while still locked: a newcomer locks a new file
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
        self._unlock_directory()


@contextlib.contextmanager
def hold(run_dir):
    """Hold `run_dir` for the block (unless this process holds it already, e.g. since the entry
    point started); RunDirInUse if another process does."""
    key = _key(run_dir)
    if key in _held:
        yield _held[key]
        return
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
