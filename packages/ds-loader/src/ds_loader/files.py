"""Writing files that are never half-written, never clobbered by a parallel run, and readable like any other file.

Every file a package writes goes through ``atomic_file``: the content goes to a hidden temporary beside the target
(``.<name>.<pid>-<token>.partial``), created with mode ``0o666`` so the kernel applies the umask, then it is
flushed to disk (fsync) and moved into place. Replacing (``overwrite=True``) is an ``os.replace``. Not replacing
(``overwrite=False``) claims the name with ``link(2)``, which fails when the name exists, so of two runs that finish
at the same moment each keeps its own file: ``o.png`` and ``o-1.png``. A run interrupted before the end leaves
nothing at the target name, and ``remove_leftovers`` removes the temporaries of runs that were killed.

A run that works in one folder for a long time (training) holds a ``FolderLock`` on it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module imports nothing heavy: a process that only writes files starts fast
    import torch

__all__ = [
    "FolderLock",
    "FolderLockedError",
    "PendingFile",
    "atomic_file",
    "numbered_path",
    "remove_leftovers",
    "save_safetensors_atomic",
    "write_bytes_atomic",
]

logger = logging.getLogger(__name__)

# When this process began writing, as far as leftovers are concerned: a temporary older than this is not ours.
PROCESS_START = time.time()
MAX_NUMBER = 100_000

# Our temporary names: .<target>.<pid>-<8 hex>.partial; older releases used mkstemp (.<target>.<8 chars>.partial)
# and .<target>.tmp-<pid>.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.partial")
_LEGACY = (re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.partial"), re.compile(r"\.(?P<target>.+)\.tmp-(?P<pid>\d+)"))
# link(2) refused by the file system (FAT, some network and FUSE mounts): claim with an exclusive placeholder.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class PendingFile:
    """A file being written: write to ``temporary``; once the ``with`` block has ended, ``path`` is the name it got."""

    def __init__(self, temporary: Path, target: Path):
        self.temporary = temporary
        self.target = target
        self.path: Path | None = None

    def __repr__(self) -> str:
        return f"PendingFile(temporary={self.temporary}, path={self.path})"


def numbered_path(path: str | os.PathLike, number: int) -> Path:
    """``name.png`` for 0, else ``name-<number>.png``: the names tried, in order, when a name is taken."""
    path = Path(path)
    return path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")


@contextmanager
def atomic_file(
    path: str | os.PathLike, *, overwrite: bool = True, clean_leftovers: bool = False
) -> Iterator[PendingFile]:
    """Write ``path`` through a temporary beside it; the file appears, complete and synced, only if the block succeeds.

    overwrite: True replaces an existing file; False never does: when ``path`` is taken (also by a run finishing at
        the same moment) the file gets the first free name of ``name-1.ext``, ``name-2.ext``, ... ``PendingFile.path``
        says which. clean_leftovers: first remove the temporaries that killed runs left for this name and its
        numbered siblings (``remove_leftovers``). The file's mode follows the umask (0644 under umask 022), whatever
        mode the writer gave the temporary. On an error or Ctrl-C the temporary is removed and nothing is at ``path``.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if clean_leftovers:
        remove_leftovers(folder, path)
    temporary = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(handle).st_mode)  # 0o666 less the umask (and what a default ACL says)
    finally:
        os.close(handle)
    pending = PendingFile(temporary, path)
    try:
        yield pending
        # Writers that replace the file they are given (safetensors writes its own temporary) make it private.
        os.chmod(temporary, mode)
        _fsync(temporary)
        pending.path = _place(temporary, path, overwrite)
        _fsync(folder, directory=True)
    finally:
        temporary.unlink(missing_ok=True)


def _place(temporary: Path, path: Path, overwrite: bool) -> Path:
    if overwrite:
        os.replace(temporary, path)
        return path
    for number in range(MAX_NUMBER):
        candidate = numbered_path(path, number)
        try:
            os.link(temporary, candidate)
        except FileExistsError:
            continue
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            if not _claim_with_placeholder(temporary, candidate):
                continue
        return candidate
    raise FileExistsError(f"cannot write {path}: it and {MAX_NUMBER - 1} numbered names beside it all exist")


def _claim_with_placeholder(temporary: Path, candidate: Path) -> bool:
    """Create ``candidate`` exclusively, then move the finished temporary over it; False when it is taken."""
    try:
        os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    try:
        os.replace(temporary, candidate)
    except BaseException:
        candidate.unlink(missing_ok=True)  # never leave an empty placeholder at the output name
        raise
    return True


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        handle = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:  # folders cannot be opened on every platform (Windows); the rename is still atomic
            return
        raise
    try:
        os.fsync(handle)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(handle)


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = True,
    clean_leftovers: bool = False,
) -> Path:
    """``safetensors.torch.save_file`` through ``atomic_file``; returns the path written (see ``overwrite`` there).

    Tensors are moved to the CPU and made contiguous; the parent folder is created when missing.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    with atomic_file(path, overwrite=overwrite, clean_leftovers=clean_leftovers) as pending:
        save_file(contiguous, str(pending.temporary), metadata=dict(metadata) if metadata else None)
    return pending.path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """``data`` to ``path`` through ``atomic_file``; the parent folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=overwrite) as pending:
        pending.temporary.write_bytes(data)
    return pending.path


def remove_leftovers(
    folder: str | os.PathLike, target: str | os.PathLike | None = None, *, started: float | None = None
) -> list[Path]:
    """Remove the temporaries (ours only, by name) that runs killed before ``started`` left in ``folder``.

    A temporary is removed only when it is older than ``started`` (default: when this process began,
    ``PROCESS_START``) and the process that wrote it is gone (or its name does not say which process). target:
    only the temporaries of this output name and its numbered siblings (``name-1.ext``, ...); None: all of ours.
    Returns what was removed and logs it as a warning (the CLI shows warnings).
    """
    folder = Path(folder)
    started = PROCESS_START if started is None else started
    family = None
    if target is not None:
        target = Path(target)
        family = re.compile(re.escape(target.stem) + r"(-\d+)?" + re.escape(target.suffix))
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        owner = _temporary_owner(entry.name)
        if owner is None or (family is not None and not family.fullmatch(owner[0])):
            continue
        pid = owner[1]
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime >= started:
                continue
            if pid is not None and _alive(pid):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # another run cleaned it first
            continue
        removed.append(Path(entry.path))
    if removed:
        names = ", ".join(p.name for p in removed[:10])
        if len(removed) > 10:
            names += f" and {len(removed) - 10} more"
        logger.warning("removed %d temporary file(s) left in %s by interrupted runs: %s", len(removed), folder, names)
    return removed


def _temporary_owner(name: str) -> tuple[str, int | None] | None:
    """(target name, pid or None) for one of our temporary names, else None."""
    for pattern in (_TEMPORARY, *_LEGACY):
        match = pattern.fullmatch(name)
        if match:
            pid = match.groupdict().get("pid")
            return match["target"], int(pid) if pid else None
    return None


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate it there; never remove what may be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLockedError(RuntimeError):
    """Another run holds the folder; the message names it (pid, host, start time) and the lock file."""


class FolderLock:
    """One run at a time in a folder: ``<folder>/<name>`` holds the holder's pid, host and start time.

    ``acquire`` creates the folder and the lock, or raises ``FolderLockedError`` naming the holder. The lock is
    also an advisory ``flock`` on the open file where the platform has it, so a holder that crashed releases it
    at once; a lock file left by a process that is gone (same host, pid not running) is taken over with a warning
    (``notice`` says so). A lock file of another host, or of a live process, is never taken over.
    """

    def __init__(self, folder: str | os.PathLike, name: str = ".ds-lock"):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.notice: str | None = None
        self._handle: int | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a holder releasing between our open and our lock: try again on the new file
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                if self._take(handle):
                    self._handle = handle
                    return self
            except BaseException:
                os.close(handle)
                raise
            os.close(handle)
        raise FolderLockedError(f"{self.folder}: could not take the lock {self.path}; another run keeps changing it")

    def _take(self, handle: int) -> bool:
        """Lock ``handle`` and write our record; False when the file was replaced meanwhile (retry)."""
        if not _flock(handle):
            raise FolderLockedError(self._held_message(_holder_record(handle)))
        try:
            if os.fstat(handle).st_ino != os.stat(self.path).st_ino:
                return False
        except FileNotFoundError:
            return False
        previous = _read_record(handle)
        if previous is not None:
            if not _gone(previous):
                raise FolderLockedError(self._held_message(previous) + f"; if that run is over, delete {self.path}")
            self.notice = (
                f"{self.folder}: taking over the lock of a run that is gone "
                f"(pid {previous.get('pid')} on {previous.get('host')}, started {previous.get('started')})"
            )
            logger.warning(self.notice)
        started = datetime.now().isoformat("T", "seconds")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(record).encode(), 0)
        os.fsync(handle)
        return True

    def _held_message(self, record: dict | None) -> str:
        if record is None:
            return f"{self.folder} is in use by another run (lock file {self.path})"
        return (
            f"{self.folder} is in use by another run: pid {record.get('pid')} on {record.get('host')}, "
            f"started {record.get('started')} (lock file {self.path})"
        )

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before closing, so nobody locks a file that is about to vanish
        finally:
            os.close(self._handle)  # closing releases the flock
            self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _flock(handle: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: the record in the file is the lock
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:  # file systems without flock: the record in the file is the lock
        return error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return True


def _gone(record: dict) -> bool:
    """Whether the run a lock record names has ended: same host, and no process with its pid."""
    pid = record.get("pid")
    return record.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _holder_record(handle: int, patience: float = 2.0) -> dict | None:
    """The record of a holder that has just taken the flock: it writes its record right after, so wait a moment
    for a complete one rather than name nobody."""
    deadline = time.monotonic() + patience
    while True:
        record = _read_record(handle)
        if (record is not None and record.get("pid") != "?") or time.monotonic() >= deadline:
            return record
        time.sleep(0.01)


def _read_record(handle: int) -> dict | None:
    size = os.fstat(handle).st_size
    if size == 0:
        return None
    try:
        record = json.loads(os.pread(handle, min(size, 65536), 0))
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?"}
    return record if isinstance(record, dict) else {"pid": "?", "host": "?", "started": "?"}
