"""One writer per output folder, and the leftovers of interrupted work.

(`process_tag` lives in `paths`, whose atomic writes use it; it is re-exported here.)

`FolderLock` keeps a second `jasper-jax train` (or `teachers` slice, `captions`, `export`) off
a folder another process is writing: a lock file that the holder keeps `flock`ed (the kernel
drops the lock when the process dies, however it dies) and that names the holder's process id,
host and command, so the refusal says who holds it. Where `flock` is not supported (some
network filesystems), the file's process id and host decide: a lock of a process that no longer
runs on this host is stale and taken over.

Temporary names of interrupted work carry `process_tag()` (host and process id), so the next
run can tell a leftover of a dead process from the work of a live one (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from jasper_jax.errors import UserError
from jasper_jax.paths import TAG_PATTERN, PathLike, host_name, is_remote, process_tag

log = logging.getLogger(__name__)
LOCK_FILE = ".jasper-jax.lock"
_HELD: dict[str, list] = {}  # lock path -> [fd, count]: re-entrant within one process


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def tag_alive(tag: str) -> bool:
    """Whether the process named by a `process_tag()` may still be running: a process of
    another host counts as alive (we cannot tell), one of this host only while its id runs."""
    match = TAG_PATTERN.search(tag)
    if match is None:
        return False
    return match.group(2) != host_name() or pid_alive(int(match.group(1)))


def _tag_in(name: str) -> str | None:
    """The `PID@HOST~` part of a temporary name, if any."""
    match = TAG_PATTERN.search(name)
    return match.group(0) if match else None


def remove_leftovers(folder: PathLike, patterns: Iterable[str], untagged: bool = True) -> list[str]:
    """Deletes entries of `folder` matching the glob `patterns` that no live process owns (a
    name without a `process_tag` is owned by nobody: callers hold the folder's lock; without
    the lock pass `untagged=False` to keep those). Returns the names removed; local folders
    only."""
    folder = Path(folder)
    if is_remote(folder) or not folder.is_dir():
        return []
    removed = []
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            tag = _tag_in(path.name)
            if (tag is None and not untagged) or (tag is not None and tag_alive(tag)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info("removed leftovers of interrupted work in %s: %s", folder, removed[:10])
    return removed


class FolderLock:
    """`with FolderLock(folder, "train", what="workdir"):` one writer at a time.

    Args:
      folder: the folder to guard (created if missing); gs:// folders are not locked.
      command: the sub-command holding it, named in a refusal.
      name: the lock file's name inside `folder` (a `teachers` slice has its own).
      what: how a refusal names the folder ("workdir", "output folder").
      flag: the command-line flag that picks another folder, named in the fix.
      wait: wait (as long as it takes, logging once a minute) while another live process holds
        the lock, instead of refusing; the kernel frees the lock of a process that dies.

    Raises (on enter):
      UserError: another live process holds the lock (unless `wait`); the folder is not
        writable.
    """

    def __init__(
        self,
        folder: PathLike,
        command: str,
        name: str = LOCK_FILE,
        what: str = "workdir",
        flag: str = "--workdir",
        wait: bool = False,
    ):
        self.folder, self.command, self.what, self.flag = folder, command, what, flag
        self.wait = wait
        self.path = None if is_remote(folder) else Path(folder).absolute() / name

    def __enter__(self) -> FolderLock:
        if self.path is None:
            log.debug("%s is remote: not locked", self.folder)
            return self
        key = str(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        _HELD[key] = [self._acquire(), 1]
        return self

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        held = _HELD[str(self.path)]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[str(self.path)]
            self.path.unlink(missing_ok=True)  # before the unlock: a waiter re-checks the inode
            os.close(held[0])
            if getattr(self, "_created", False):  # a refused or empty run leaves no folder
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()

    def _acquire(self) -> int:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise UserError(
                f"{self.what} {self.folder} is a file, not a folder; pass another {self.flag}"
            )
        self._created = not self.path.parent.exists()
        last_note = 0.0
        while True:
            # inside the loop: a holder that made the folder removes it on release if empty
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                locked = self._flock(fd)
                if locked and _same_file(fd, self.path):
                    self._write_owner(fd)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if locked:
                continue  # the holder released it between our open and our lock: retry
            if not self.wait:
                raise UserError(self._refusal())
            if time.monotonic() - last_note > 60:
                log.info("waiting: %s", self._refusal())
                last_note = time.monotonic()
            time.sleep(0.5)

    def _flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:  # no flock here (some network filesystems): the file decides
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            owner = _read_owner(self.path)
            return not owner or not tag_alive(owner.get("tag", ""))

    def _write_owner(self, fd: int) -> None:
        owner = {
            "tag": process_tag(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)

    def _refusal(self) -> str:
        """Who holds the lock and what to do, in one line."""
        owner = _read_owner(self.path) or {}
        who = (
            f"`jasper-jax {owner.get('command', '?')}` (pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, since {owner.get('since', '?')})"
        )
        return (
            f"{self.what} {self.folder} is in use by {who}; wait for it to finish or pass "
            f"another {self.flag} (if that process is gone, delete {self.path})"
        )


def _same_file(fd: int, path: Path) -> bool:
    """Whether `fd` is still the file at `path` (a releasing holder unlinks it first)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
