"""Named places where a fault-injection run kills this process (``bench/chaos.py``, issue 20).

``fault_point(name, subject)`` does nothing unless the setting ``FAULT_KILL_DIR`` is set and a file
named ``name`` exists in it. Then the first process to remove that file (one kill per arming)
kills itself with SIGKILL, as a crashed machine would: no exception, no clean-up, no rollback
but PostgreSQL's own of the open transaction. ``FAULT_KILL_DIR`` is empty by default, so in
every ordinary process a fault point costs one settings read.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from django.conf import settings

POINTS = (
    "after_upstream_accept",  # the provider accepted the job; we have not recorded it
    "after_outputs_stored",  # the results are in storage; the outcome is not written
    "in_outcome_transaction",  # inside the SUCCESS transaction, before its commit
)


def fault_point(name: str, subject: object = "") -> None:
    """Kill this process here if the run armed ``name``; ``subject`` (what it was working on)
    is written to ``<name>.killed`` first, so the run knows which task the kill hit."""
    if not settings.FAULT_KILL_DIR:
        return
    folder = Path(settings.FAULT_KILL_DIR)
    try:
        os.remove(folder / name)  # only one process wins each arming
    except FileNotFoundError:
        return
    (folder / f"{name}.killed").write_text(str(subject))
    os.kill(os.getpid(), signal.SIGKILL)
