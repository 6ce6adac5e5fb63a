"""Work that flows hand to Ray (or run in-process): panels, tokens, training, generation, evaluation."""

from __future__ import annotations

import os
import sys


def quiet_broken_pipe(fn, *args) -> int:
    """fn(*args), where a reader that closed the pipe early (`| head`) ends the command quietly, with
    the shell's status for SIGPIPE, and not with a traceback."""
    try:
        status = fn(*args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python would flush stdout again at exit and print a second error: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13

