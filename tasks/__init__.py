"""Work that flows hand to Ray (or run in-process): panels, tokens, training, generation, evaluation."""

from __future__ import annotations

import os
import select
import sys


def quiet_broken_pipe(fn, *args) -> int:
    """fn(*args), where a reader that closed the pipe early (`| head`) ends the command quietly, with
    the shell's status for SIGPIPE, and not with a traceback. Any other broken pipe (a socket to Ray
    or Prefect, a child process) is the command's error and is raised as it was."""
    try:
        status = fn(*args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # Python would flush stdout again at exit and print a second error: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on the writing
    end); where poll is missing, a broken pipe is taken to be stdout's."""
    if not hasattr(select, "poll"):
        return True
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    p = select.poll()
    p.register(fd, 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
