"""The exit-code contract of every entry point, and the one error path that keeps it.

    @entry_point
    def main(argv: list[str]) -> int: ...

0 done, 1 verification failed, 2 bad input (an output that cannot be written included), 3 CUDA
out of memory, 4 the loss became non-finite, 130 interrupted (Ctrl-C or SIGTERM). A failure is
one line on stderr, never a traceback."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILED = 1  # verification failed (train.py under torchrun: any failed rank)
EXIT_BAD_INPUT = 2
EXIT_OOM = 3  # the run's metrics then say oom: true
EXIT_NON_FINITE = 4
EXIT_INTERRUPTED = 130


class BadInput(ValueError):
    """Something the user must fix (a setting, a file, a path): one line naming the value and
    the fix, exit 2. Any other exception is a bug and keeps its traceback."""


class TrainingOOM(RuntimeError):
    """CUDA ran out of memory during training; the metrics record it."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def report_oom(error: TrainingOOM) -> int:
    print(f"error: CUDA out of memory: {error}", file=sys.stderr, flush=True)
    return EXIT_OOM


def leave_now(error: TrainingOOM) -> NoReturn:
    """Report as entry_point does and exit at once: for a rank that ran out of memory while
    the others wait in a collective it cannot join, where leaving the process group (NCCL)
    would wait for them. torchrun then stops the others."""
    os._exit(report_oom(error))


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary files are removed on the way out


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """main, with bad input (BadInput), a CUDA OOM, a non-finite loss, Ctrl-C and SIGTERM
    turned into their exit codes and one line on stderr."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return main(*args, **kwargs)
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except TrainingOOM as e:
            return report_oom(e)
        except NonFiniteLoss as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NON_FINITE
        except KeyboardInterrupt:
            print("error: interrupted; nothing was left half-written (re-run to finish)",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)

    return guarded
