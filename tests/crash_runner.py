"""The test suite's own crash hook: run the real CLI and kill -9 it at one named crash point.

    python -m tests.crash_runner POINT -- <aiqueue CLI args>

It replaces `QueueManager.fault` (inert in the product) in this process only, with a function
that sends SIGKILL to its own process when the manager reaches POINT: no handler, no `finally`,
no rollback, no flush runs, exactly as when the OOM killer or a power cut strikes mid-transaction.
Then it calls `aiqueue.cli.app.main(args)`, the shipped entry point with its one catch point.

If the point is never reached the CLI exits normally, so a test can tell "crashed at POINT"
(returncode == -SIGKILL) from "never got there" (0 or the CLI's own exit code). The shipped
product has no flag, variable or file that does this; tests/test_crashes.py checks that.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

# Every named point the manager calls self.fault() with (tests/test_crashes.py checks this list
# against manager.py, so a point renamed or added there cannot silently go untested).
POINTS = (
    "enqueue:after-charge",  # inside the enqueue transaction, after the charge, before commit
    "fill:after-claim",  # slot claimed and committed, before submitting
    "fill:after-accept",  # the provider accepted, before the task id is stored
    "end:in-refund",  # inside the ending transaction, after the refund row, before commit
    "cleanup:between-jobs",  # cleanup committed the end of one job, before the next
)

USAGE = "usage: python -m tests.crash_runner POINT -- <aiqueue CLI args>"


def kill_at(point: str) -> None:
    """Make every QueueManager in this process kill the process when it reaches `point`."""
    from aiqueue.manager import QueueManager

    if point not in POINTS:
        raise ValueError(f"unknown crash point {point!r}; known: {', '.join(POINTS)}")

    def fault(reached: str) -> None:
        if reached == point:
            os.kill(os.getpid(), signal.SIGKILL)

    QueueManager.fault = staticmethod(fault)  # type: ignore[assignment]


def run(argv: Sequence[str]) -> NoReturn:
    args = list(argv)
    if len(args) < 2 or args[1] != "--":
        sys.exit(USAGE)
    point, cli_args = args[0], args[2:]
    try:
        kill_at(point)
    except ValueError as exc:
        sys.exit(f"{exc}\n{USAGE}")
    from aiqueue.cli.app import main

    main(cli_args)


if __name__ == "__main__":
    run(sys.argv[1:])
