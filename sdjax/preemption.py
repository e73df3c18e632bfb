"""SIGTERM (a preemption notice) handling, written once for every long-running entry point.

  with OnSigterm(single_process_only=True) as term:  # training: note it, stop at the next step boundary
    ...; if term.requested: save and exit
  with OnSigterm(raise_=Interrupted):                 # sampling jobs: stop now (every file on disk is complete)
    ...

The handler is installed only from the main thread (Python allows signal handlers there alone); with
`single_process_only` (training) only in a single-process run, as a multi-process run learns of preemption
through jax's coordination service instead. The previous handler comes back on exit, whatever happened inside.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

import jax


class OnSigterm:
  """Context manager: `requested` turns True on SIGTERM; with `raise_`, the handler raises it instead."""

  def __init__(self, raise_: Callable[[str], BaseException] | None = None, *, single_process_only: bool = False):
    self._raise = raise_
    self._single_only = single_process_only
    self._previous = None
    self._installed = False
    self.requested = False

  def _handle(self, signum, frame):
    self.requested = True
    if self._raise is not None:
      raise self._raise("SIGTERM")

  def __enter__(self) -> "OnSigterm":
    single = jax.process_count() == 1 or not self._single_only
    if single and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def __exit__(self, *exc) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False
