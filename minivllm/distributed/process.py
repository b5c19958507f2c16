"""Child processes: start one with its pipes, hear from it or of its death, stop it, leave fast.

The engine starts processes of its own in two places, the tensor-parallel workers
(worker/executor.py) and the server's engine process (entrypoints/engine_core.py), and both
live the same life:

    parent                                            child
    ChildProcess(target, args)   spawn, pipes ─────>  target(*args, pipe ends)
    receive(timeout)             <── messages ──────  "started", "ready", results, errors
      raises ChildDied when the pipe closes (the child exited, crashed or was killed)
      without the message
    stop_children(...)           ── stop message ──>  leaves: exit_now(0)
      waits, then kills what is left                  if the parent dies first, its next read
                                                      of the pipe ends (EOFError): it leaves

Right after the start the parent closes its copies of the child's pipe ends, so each pipe has one
end on either side: when either process dies, the other's next read sees the pipe close. That is
the watchdog in both directions, and it costs nothing while both live. `exit_now` leaves a child
without the interpreter's teardown of torch, which takes seconds and would hold up the parent's
`stop_children`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection
from typing import Any, NoReturn


class ChildDied(RuntimeError):
    """The child's pipe closed before the message the parent waited for: it exited or died."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"exit code {exitcode}")
        self.exitcode = exitcode


class ChildProcess:
    """A process started with "spawn" and the parent's ends of its pipes.

    The child runs `target(*args, *ends)`. With `duplex` (the default) it gets one two-way pipe
    end; otherwise two one-way ends, (receiving, sending), which the OS lets hold a burst of
    `pipe_bytes` (Linux), so a parent that sends much at once does not block while the child
    is busy. The parent sends on `to_child` and reads `from_child` (one object when duplex).
    """

    def __init__(self, target: Callable, args: tuple, name: str, daemon: bool = True,
                 duplex: bool = True, pipe_bytes: int | None = None):
        context = multiprocessing.get_context("spawn")
        if duplex:
            ours, theirs = context.Pipe()
            self.to_child = self.from_child = ours
            child_ends = (theirs,)
        else:
            child_receives, self.to_child = one_way_pipe(pipe_bytes)
            self.from_child, child_sends = one_way_pipe(pipe_bytes)
            child_ends = (child_receives, child_sends)
        self.process = context.Process(target=target, args=(*args, *child_ends), name=name,
                                       daemon=daemon)
        self.process.start()
        for end in child_ends:  # the child holds the only copies now: its death closes them
            end.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def receive(self, timeout: float | None) -> Any:
        """The child's next message, waiting at most `timeout` seconds (None: forever).

        TimeoutError if none came in time; ChildDied if its pipe closed first."""
        ready = connection.wait([self.from_child, self.process.sentinel], timeout)
        if not ready:
            raise TimeoutError(f"no message within {timeout} s")
        message = self.read() if self.from_child in ready else None
        if message is None:
            raise ChildDied(self.exitcode())
        return message

    def read(self) -> Any:
        """The next message (blocking), or None if the pipe is closed."""
        try:
            return self.from_child.recv()
        except (EOFError, OSError):
            return None

    def exitcode(self) -> int | None:
        """The exit code of a child that is gone (reaped first, waiting up to a second)."""
        self.process.join(timeout=1.0)
        return self.process.exitcode


def stop_children(children: Sequence[ChildProcess], message: Any, timeout: float) -> None:
    """Send each child `message`, wait up to `timeout` seconds for all of them to leave, kill
    the ones that did not, and close the pipes to them. `timeout` 0: kill at once.

    A plain function over plain objects, so a finalizer can call it without holding the
    object that owns the children."""
    if timeout > 0:
        for child in children:
            with contextlib.suppress(OSError, ValueError):  # gone already, or pipe closed
                child.to_child.send(message)
        deadline = time.monotonic() + timeout
        for child in children:
            child.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.process.is_alive():
            child.process.kill()
            child.process.join()
        child.to_child.close()


def exit_now(code: int) -> NoReturn:
    """Leave the child process now, skipping the interpreter's teardown (seconds, with torch)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_way_pipe(size: int | None = None) -> tuple[connection.Connection, connection.Connection]:
    """(receiving end, sending end) of a pipe that holds `size` bytes (None: the OS default)."""
    receiving, sending = multiprocessing.get_context("spawn").Pipe(duplex=False)
    if size:
        _widen(sending, size)
    return receiving, sending


def _widen(conn, size: int) -> None:
    """Let a pipe hold `size` bytes (Linux only; elsewhere, or above the system's
    pipe-max-size, it keeps its default)."""
    with contextlib.suppress(AttributeError, OSError):
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
