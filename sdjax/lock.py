"""One process per workdir: an exclusive lock on `<dir>/.lock`, which names its owner (pid, host, start time).

The lock is the kernel's (flock): it is held for as long as the owning process lives and is gone when that
process dies in any way (kill -9 included), so a lock is never stale and of two processes starting at once
exactly one gets it. The file itself stays (removing it would race with a process opening it); its content
names the current or last owner, for the message the second process prints.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time


class LockedError(RuntimeError):
  """The workdir is in use by another process."""


class WorkdirLock:
  """`with WorkdirLock(dir):` holds `<dir>/.lock` for the block; LockedError if another process holds it."""

  def __init__(self, directory: str, what: str = "run"):
    self.path = os.path.join(directory, ".lock")
    self.what = what
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
      except (OSError, ValueError):
        owner = {}
      os.close(fd)
      who = (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
             if isinstance(owner, dict) else "an unknown process")
      raise LockedError(f"{os.path.dirname(os.path.abspath(self.path))} is in use by another {self.what} ({who}); "
                        f"wait for it to finish or use another directory") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fd, self._fd = self._fd, None
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
